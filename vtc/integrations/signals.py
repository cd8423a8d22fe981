"""Signals for vision-stage operators: open a ``vtc.taps`` tap for what a pipeline requires.

A pipeline's ``requires`` (``{"cls_attn": [16, ..., 22], "keys": [22]}``) names the per-token
signals its operators read. :func:`open_tap` checks up front that the tower can give them (a
CLS-attention signal needs a CLS token: SigLIP has none) and attaches a ``vtc.taps`` tap, whose
hooks record them on every forward of the tower until ``tap.remove()`` (``tap.signals`` holds the
latest forward's). The tap resolves negative layers and ``"feature"`` / ``"last"`` once, against
the tower and the model's feature layer. :func:`tokens_from` builds the
:class:`~vtc.tokens.VisualTokens` of the feature-layer patch tokens with the tap's signals and its
``layer_space`` (so operators may ask for any layer form).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from vtc.errors import SignalError
from vtc.integrations.towers import prefix_tokens
from vtc.taps.tap import CLS_SIGNALS  # the signals that need a tower with a CLS token
from vtc.tokens import Layout, VisualTokens

__all__ = ["CLS_FREE", "CLS_SIGNALS", "SIGNAL_FREE", "check_tower_signals", "cls_free_advice", "open_tap", "tokens_from"]

#: operators that read no tower signal (m3 only on square grids)
SIGNAL_FREE = ("divprune", "tome", "random", "uniform", "pool", "m3")
#: operators that score by a tower signal every tower gives, CLS or not (attention received, keys)
CLS_FREE = ("hiprune", "visionzip:signal=attn_received", "aim_merge")


def cls_free_advice() -> str:
    """The operators to use instead on a tower without a CLS token (the end of every such error)."""
    return (f"use operators that need no tower signal: {', '.join(SIGNAL_FREE)} (m3: square grids); or ones that "
            f"score by a CLS-free signal (attention received, keys): {', '.join(CLS_FREE)}; or the in-LLM operators")


def check_tower_signals(tower: nn.Module, requires: Mapping[str, Sequence[int]], who: str = "the pipeline",
                        prefix: int | None = None) -> None:
    """Raise :class:`SignalError` if ``requires`` asks for a CLS signal the tower cannot give.

    ``prefix``: the tower's leading non-patch tokens, if the caller knows better than
    :func:`~vtc.integrations.towers.prefix_tokens`.
    """
    cls_needed = sorted(s for s in requires if s in CLS_SIGNALS)
    if cls_needed and (prefix_tokens(tower) if prefix is None else prefix) == 0:
        raise SignalError(
            f"{who} reads {', '.join(cls_needed)} (the CLS token's attention), but the vision tower "
            f"{type(tower).__name__} has no CLS token (SigLIP-style towers pool without one). On this model "
            f"{cls_free_advice()}."
        )


def open_tap(tower: nn.Module, requires: Mapping[str, Sequence[int]], who: str = "the pipeline",
             prefix: int | None = None, feature_layer: int | None = None) -> Any | None:
    """A ``vtc.taps`` tap recording ``requires`` on ``tower``, or None when nothing is required.

    ``feature_layer``: the tower layer whose output the model reads (resolves ``"feature"``).
    """
    if not requires:
        return None
    check_tower_signals(tower, requires, who, prefix)
    try:
        from vtc.taps import attach
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SignalError(
            f"{who} needs vision-tower signals {dict(requires)} but vtc.taps cannot be imported ({e}); "
            "install vtc completely, or use operators that need no signals"
        ) from e
    return attach(tower, {k: list(v) for k, v in requires.items()}, feature_layer=feature_layer)


def tokens_from(features: Tensor, tap: Any | None, requires: Mapping[str, Sequence[int]],
                layout: Layout | tuple[Layout, ...] | None = None) -> VisualTokens:
    """VisualTokens of patch ``features`` ``[B, N, D]`` carrying the required signals ``tap`` recorded.

    Only the signals in ``requires`` are attached (a tap may record more, e.g. hidden states), so
    every keep/merge gathers no more than the operators read.
    """
    signals: dict[str, dict[int, Tensor]] = {}
    if tap is not None:
        recorded = tap.signals
        for name in requires:
            if name not in recorded:
                continue
            signals[name] = dict(recorded[name])
        B, N = features.shape[:2]
        for name, per_layer in signals.items():
            for layer, t in per_layer.items():
                if tuple(t.shape[:2]) != (B, N):
                    raise SignalError(
                        f"the tap recorded {name}[{layer}] for {tuple(t.shape[:2])} tokens but the features are "
                        f"{(B, N)}: signals must cover exactly the patch tokens (CLS dropped) of the same forward"
                    )
                per_layer[layer] = t.to(features.device)
    return VisualTokens(x=features, layout=layout, signals=signals, layer_space=getattr(tap, "layer_space", None))
