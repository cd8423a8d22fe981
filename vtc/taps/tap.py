"""Tap: record CLS attention, CLS logits, keys and hidden states while a vision tower runs as it is.

:func:`attach` finds the adapter for the tower's family (Hugging Face CLIP/SigLIP, timm
VisionTransformer, open_clip VisionTransformer), validates the request (``{"cls_attn": [16, 22],
"keys": [-2]}``, the form of :attr:`vtc.Pipeline.requires`), and installs forward hooks on the
modules of the requested layers only. Each forward of the tower then fills :attr:`Tap.signals`
(keyed by signal name, then by the non-negative HF layer number): the hooks read the queries and
keys the tower computes anyway and compute only the CLS row of the attention (see
:mod:`vtc.attention`), so the tower keeps its own fused attention (SDPA, xformers, FlashAttention)
and its outputs are bit-identical with and without the tap. :meth:`Tap.remove` (or leaving a
``with tap:`` block) removes every hook; no attribute is ever set on the tower.

Signals, all over the patch tokens only (CLS and other prefix tokens such as registers dropped):

- ``cls_attn[l]`` ``[B, N]`` float32: post-softmax CLS→patch attention of layer ``l`` (softmax over
  all keys, CLS included, then the patch columns), mean over heads;
- ``cls_logits[l]`` ``[B, N]`` float32: the pre-softmax scaled logits ``q·k/sqrt(d)`` of the CLS
  row, mean over heads;
- ``keys[l]`` ``[B, N, d_head]``: the keys of layer ``l``'s attention, mean over heads, in the
  tower's dtype;
- ``hidden[l]`` ``[B, N, D]``: the output of layer ``l`` (HF ``hidden_states[l + 1]``).

Signals are detached (no autograd graph). Layer ``l`` is HF's ``encoder.layers[l]``, which is
timm's ``blocks[l]`` and open_clip's ``transformer.resblocks[l]``; LLaVA's features are the output
of layer 22 of 24 (``-2``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vtc.attention import cls_attention
from vtc.errors import TapError, UnsupportedModelError

__all__ = ["SIGNALS", "CLS_SIGNALS", "Tap", "TowerAdapter", "attach"]

#: Every signal a tap can record.
SIGNALS: tuple[str, ...] = ("cls_attn", "cls_logits", "keys", "hidden")
#: The signals that need a CLS token.
CLS_SIGNALS: frozenset[str] = frozenset({"cls_attn", "cls_logits"})


class TowerAdapter:
    """What a tap needs to know about one family of vision towers.

    Subclasses set ``family``, ``num_layers``, ``num_prefix_tokens`` (tokens before the patches:
    CLS, registers, ...), ``has_cls`` (the first token is a CLS token), ``grid`` (the patch grid
    ``(h, w)`` at the configured image size, or None), and implement :meth:`layer` (the module
    whose output is layer ``l``'s output), :meth:`tokens_in` (token count of layer 0's input) and
    :meth:`hook_attention` (hooks that call :meth:`Tap.record_qk` / :meth:`Tap.record_logits` /
    :meth:`Tap.record_keys` for layer ``l``).
    """

    family: str = "?"
    num_layers: int = 0
    num_prefix_tokens: int = 0
    has_cls: bool = False
    grid: tuple[int, int] | None = None
    #: dimension of the token axis in a layer's input/output (1 for [B, N, D], 0 for [N, B, D])
    seq_dim: int = 1

    def layer(self, l: int) -> nn.Module:
        raise NotImplementedError

    def tokens_in(self, args: tuple, kwargs: dict) -> int:
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
        return int(x.shape[self.seq_dim])

    def layer_output(self, out: Any) -> Tensor:
        """A layer module's output as ``[B, N, D]``."""
        x = out[0] if isinstance(out, (tuple, list)) else out
        return x.transpose(0, 1) if self.seq_dim == 0 else x

    def hook_attention(self, l: int, want: frozenset[str], tap: Tap) -> list[RemovableHandle]:
        raise NotImplementedError


def _adapter_for(tower: nn.Module) -> TowerAdapter:
    """The adapter of ``tower``'s family, or :class:`UnsupportedModelError`."""
    if not isinstance(tower, nn.Module):
        raise UnsupportedModelError(f"attach() needs a vision tower (a torch.nn.Module), got {type(tower).__name__}")
    mod = type(tower).__module__ or ""
    if mod.startswith("transformers."):
        from vtc.taps.hf_clip import HFVisionAdapter

        return HFVisionAdapter(tower)
    if mod.startswith("open_clip.") and isinstance(getattr(tower, "visual", None), nn.Module):
        tower = tower.visual  # a whole open_clip CLIP model: tap its image tower
        mod = type(tower).__module__ or ""
    if mod.startswith("open_clip.") and isinstance(getattr(tower, "trunk", None), nn.Module):
        tower = tower.trunk  # open_clip's TimmModel wraps a timm trunk
        mod = type(tower).__module__ or ""
    if mod.startswith("timm."):
        from vtc.taps.timm_vit import TimmVitAdapter

        return TimmVitAdapter(tower)
    if mod.startswith("open_clip."):
        from vtc.taps.open_clip_vit import OpenClipVitAdapter

        return OpenClipVitAdapter(tower)
    raise UnsupportedModelError(
        f"vtc taps do not know the vision tower {type(tower).__module__}.{type(tower).__name__}. Supported: "
        "Hugging Face CLIPVisionModel / SiglipVisionModel (in LLaVA: model.model.vision_tower), timm "
        "VisionTransformer, open_clip VisionTransformer (model.visual)."
    )


def _resolve(requires: Any, adapter: TowerAdapter) -> dict[str, list[int]]:
    if hasattr(requires, "requires") and not isinstance(requires, Mapping):
        requires = requires.requires  # a Pipeline or an operator
    if not isinstance(requires, Mapping):
        raise TapError(
            f"requires must map a signal name to layer numbers, e.g. {{'cls_attn': [22]}}, got {type(requires).__name__}"
        )
    L = adapter.num_layers
    out: dict[str, list[int]] = {}
    for name, layers in requires.items():
        if name not in SIGNALS:
            raise TapError(f"taps cannot record the signal {name!r}; they record {', '.join(SIGNALS)}")
        if name in CLS_SIGNALS and not adapter.has_cls:
            raise TapError(
                f"this {adapter.family} tower has no CLS token, so it has no {name!r}; "
                "request 'keys' or 'hidden' instead, or use a method that does not score by CLS attention"
            )
        if isinstance(layers, int) or not isinstance(layers, Iterable):
            layers = [layers]
        resolved = set()
        for l in layers:
            if isinstance(l, bool) or not isinstance(l, int):
                raise TapError(f"layer numbers must be integers, got {l!r} in requires[{name!r}]")
            if not -L <= l < L:
                raise TapError(
                    f"layer {l} in requires[{name!r}] does not exist: this {adapter.family} tower has {L} layers, "
                    f"valid layers are 0..{L - 1} (or -{L}..-1 counting from the end)"
                )
            resolved.add(l % L)
        if resolved:
            out[name] = sorted(resolved)
    return out


class Tap:
    """Hooks on a vision tower that record signals during its normal forward (module docstring).

    Use :func:`attach` to make one. :attr:`signals` holds the signals of the most recent forward
    (a new dict each forward); :meth:`clear` empties it, :meth:`remove` detaches every hook.
    """

    def __init__(self, tower: nn.Module, requires: Any) -> None:
        self.tower = tower
        self.adapter = _adapter_for(tower)
        self.requires: dict[str, list[int]] = _resolve(requires, self.adapter)
        self.signals: dict[str, dict[int, Tensor]] = {}
        self.num_tokens: int | None = None  # tokens (prefix included) seen in the last forward
        self._handles: list[RemovableHandle] = []
        a = self.adapter
        self._handles.append(a.layer(0).register_forward_pre_hook(self._begin, with_kwargs=True))
        per_layer: dict[int, set[str]] = {}
        for name, layers in self.requires.items():
            for l in layers:
                per_layer.setdefault(l, set()).add(name)
        try:
            for l, names in sorted(per_layer.items()):
                if "hidden" in names:
                    self._handles.append(a.layer(l).register_forward_hook(self._hidden_hook(l)))
                want = frozenset(names) - {"hidden"}
                if want:
                    self._handles.extend(a.hook_attention(l, want, self))
        except BaseException:
            self.remove()
            raise

    # ------------------------------------------------------------------ facts
    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches (1 for a CLS token, more with registers, 0 for SigLIP)."""
        return self.adapter.num_prefix_tokens

    @property
    def has_cls(self) -> bool:
        return self.adapter.has_cls

    @property
    def num_patches(self) -> int | None:
        """Patch tokens per image in the most recent forward (None before the first)."""
        return None if self.num_tokens is None else self.num_tokens - self.num_prefix_tokens

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # ------------------------------------------------------------------ recording (called by adapters)
    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.num_tokens = self.adapter.tokens_in(args, kwargs)
        self.signals = {name: {} for name in self.requires}

    def _hidden_hook(self, l: int):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            x = self.adapter.layer_output(out)
            self.signals.setdefault("hidden", {})[l] = x[:, self.num_prefix_tokens:].detach()

        return hook

    def record_logits(self, l: int, want: frozenset[str], logits: Tensor, probs: Tensor) -> None:
        """Record ``cls_attn`` / ``cls_logits`` of layer ``l`` from the CLS row ``[B, H, N_all]``."""
        p = self.num_prefix_tokens
        if "cls_attn" in want:
            self.signals.setdefault("cls_attn", {})[l] = probs[:, :, p:].mean(1).detach()
        if "cls_logits" in want:
            self.signals.setdefault("cls_logits", {})[l] = logits[:, :, p:].mean(1).detach()

    def record_qk(self, l: int, want: frozenset[str], q_cls: Tensor | None, k: Tensor, scale: float) -> None:
        """Record layer ``l``'s signals from the CLS query ``[B, H, d]`` and keys ``[B, H, N_all, d]`` (unscaled)."""
        if q_cls is not None and want & CLS_SIGNALS:
            logits, probs = cls_attention(q_cls.detach(), k.detach(), scale)
            self.record_logits(l, want, logits, probs)
        if "keys" in want:
            self.record_keys(l, k.detach()[:, :, self.num_prefix_tokens:].mean(1))

    def record_keys(self, l: int, keys: Tensor) -> None:
        """Record head-mean patch keys ``[B, N, d]`` of layer ``l``."""
        self.signals.setdefault("keys", {})[l] = keys.detach()

    # ------------------------------------------------------------------ lifecycle
    def clear(self) -> None:
        """Forget the recorded signals (the hooks stay)."""
        self.signals = {}
        self.num_tokens = None

    def remove(self) -> None:
        """Remove every hook this tap installed (idempotent). The tower is left as it was."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return f"Tap({self.family}, {self.requires}, {state})"


def attach(tower: nn.Module, requires: Any) -> Tap:
    """Attach a :class:`Tap` recording ``requires`` (``{"cls_attn": [16, 22], "keys": [-2]}``) to ``tower``.

    ``requires`` has the form of :attr:`vtc.Pipeline.requires` (a Pipeline is accepted too);
    negative layers count from the end. Raises :class:`~vtc.errors.UnsupportedModelError` for an
    unknown tower and :class:`~vtc.errors.TapError` for a layer that does not exist, an unknown
    signal, or a CLS signal on a tower without a CLS token.
    """
    return Tap(tower, requires)
