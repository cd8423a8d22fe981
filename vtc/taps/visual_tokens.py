"""Turn a tapped tower's output into :class:`~vtc.tokens.VisualTokens` that operators consume directly.

:func:`to_tokens` drops the prefix tokens (CLS, registers) from the tower's features, numbers the
patch tokens ``0..N-1`` in raster order, attaches a grid :class:`~vtc.tokens.Layout` (given, else
the tower's own patch grid, else a square one inferred from ``N``) and the tap's signals from the
same forward, and the tap's :class:`~vtc.taps.layers.LayerSpace` so that operators can ask for
``"feature"`` or negative layers. Packed towers (Qwen VL) have no ``[B, N]`` batch: read them with
:meth:`~vtc.taps.Tap.per_image` and :func:`~vtc.taps.qwen_vl.to_merged_grid` instead.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from vtc.errors import InputError, TapError
from vtc.taps.tap import Tap
from vtc.tokens import Layout, VisualTokens

__all__ = ["to_tokens"]


def to_tokens(features: Tensor, tap: Tap, layout: Layout | Any = None) -> VisualTokens:
    """``VisualTokens`` of the patch tokens of ``features`` with ``tap``'s signals.

    ``features`` is ``[B, N + prefix, D]`` (prefix tokens, i.e. CLS and registers, are dropped) or
    already ``[B, N, D]`` patch tokens, from the forward the tap last recorded (e.g.
    ``out.hidden_states[-2]`` of a HF tower, ``tap.signals["hidden"][22]``). ``layout`` defaults to
    the tower's patch grid when it holds ``N`` tokens, else a square grid of ``N``.
    """
    if not isinstance(features, Tensor):
        raise InputError(
            f"to_tokens needs the tower's features as a [B, N, D] tensor, got {type(features).__name__}; "
            "for a Hugging Face output pass e.g. out.last_hidden_state or out.hidden_states[-2]"
        )
    if tap.packed:
        raise TapError(
            f"to_tokens builds [B, N] tokens of a batched tower; this {tap.family} packs every image into one "
            "sequence. Read its signals per image with tap.per_image(name, layer) and aggregate them to the merged "
            "grid with vtc.taps.to_merged_grid"
        )
    n = tap.num_patches
    if n is None:
        raise TapError("the tap has recorded no forward yet; run the vision tower with the tap attached first")
    p = tap.num_prefix_tokens
    if features.dim() != 3:
        raise InputError(f"to_tokens needs [B, N, D] features, got shape {tuple(features.shape)}")
    if features.shape[1] == n + p:
        x = features[:, p:]
    elif features.shape[1] == n:
        x = features
    else:
        raise InputError(
            f"features hold {features.shape[1]} tokens but the tapped forward had {n} patch tokens "
            f"(+{p} prefix); pass features from the same forward"
        )
    if layout is None:
        g = tap.adapter.grid
        layout = Layout.grid(*g) if g is not None and g[0] * g[1] == n else Layout.square(n)
    signals = {name: dict(per_layer) for name, per_layer in tap.signals.items()}
    return VisualTokens(x=x, layout=layout, signals=signals, layer_space=tap.layer_space)
