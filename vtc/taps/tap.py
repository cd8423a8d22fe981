"""Tap: record attention signals, keys and hidden states while a vision tower runs as it is.

:func:`attach` finds the adapter for the tower's family (Hugging Face CLIP/SigLIP, timm
VisionTransformer, open_clip VisionTransformer, the Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision
towers), resolves the request (``{"cls_attn": [16, "feature"], "keys": [-2]}``, the form of
:attr:`vtc.Pipeline.requires`) against the tower's :class:`~vtc.taps.layers.LayerSpace` once, and
installs forward hooks on the modules of the requested layers only. Each forward of the tower then
fills :attr:`Tap.signals` (keyed by signal name, then by the non-negative layer number): the hooks
read the queries and keys the tower computes anyway and compute only what was asked (the CLS row
of the attention, see :mod:`vtc.attention`; attention received in chunks of query rows, see
:mod:`vtc.taps.received`), so the tower keeps its own fused attention (SDPA, xformers,
FlashAttention) and its outputs are bit-identical with and without the tap. :meth:`Tap.remove` (or
leaving a ``with tap:`` block) removes every hook; no attribute is ever set on the tower.

Signals, all over the patch tokens only (CLS and other prefix tokens such as registers dropped):

- ``cls_attn[l]`` ``[B, N]`` float32: post-softmax CLS→patch attention of layer ``l`` (softmax over
  all keys, CLS included, then the patch columns), mean over heads;
- ``cls_logits[l]`` ``[B, N]`` float32: the pre-softmax scaled logits ``q·k/sqrt(d)`` of the CLS
  row, mean over heads;
- ``keys[l]`` ``[B, N, d_head]``: the keys of layer ``l``'s attention, mean over heads, in the
  tower's dtype;
- ``hidden[l]`` ``[B, N, D]``: the output of layer ``l`` (HF ``hidden_states[l + 1]``);
- ``attn_received[l]`` ``[B, N]`` float32 (CLS-free): the post-softmax attention each patch token
  receives in layer ``l``, averaged over ALL query rows (the CLS and register rows included) and
  over heads; the prefix columns are then dropped (HiPrune's score: the column mean over all 577
  rows and 16 heads of CLIP-L, CLS column dropped). Computed in chunks of query rows, never the
  ``N x N`` map at once (``max_chunk_elements``);
- ``key_norms[l]`` ``[B, N]`` float32 (CLS-free): the mean over heads of each head's key L2 norm
  (see :mod:`vtc.taps.received` for why norm-then-mean).

Packed towers (Qwen VL) record ``[S]`` / ``[S, ...]`` tensors over the whole packed sequence instead
of ``[B, N]``, in the tower's input token order; :meth:`Tap.per_image` splits any tap's signals per
image (see :mod:`vtc.taps.qwen_vl`).

Signals are detached (no autograd graph). Layer ``l`` is HF's ``encoder.layers[l]``, which is
timm's ``blocks[l]``, open_clip's ``transformer.resblocks[l]`` and Qwen's ``blocks[l]``; LLaVA's
features are the output of layer 22 of 24 (``-2``). Layers may be given as negative numbers,
``"last"`` or ``"feature"`` (the model's feature layer: ``attach(..., feature_layer=-2)`` for LLaVA;
a Qwen tower's is its last layer); see :mod:`vtc.taps.layers`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vtc.attention import cls_attention
from vtc.errors import TapError, UnsupportedModelError
from vtc.taps.layers import Layer, LayerSpace
from vtc.taps.received import key_norms, received_attention

__all__ = ["SIGNALS", "CLS_SIGNALS", "CLS_FREE_SIGNALS", "Tap", "TowerAdapter", "attach"]

#: Every signal a tap can record.
SIGNALS: tuple[str, ...] = ("cls_attn", "cls_logits", "keys", "hidden", "attn_received", "key_norms")
#: The signals that need a CLS token.
CLS_SIGNALS: frozenset[str] = frozenset({"cls_attn", "cls_logits"})
#: Per-token attention signals for towers without a CLS token (and for methods that read them anyway).
CLS_FREE_SIGNALS: frozenset[str] = frozenset({"attn_received", "key_norms"})


class TowerAdapter:
    """What a tap needs to know about one family of vision towers.

    Subclasses set ``family``, ``num_layers``, ``num_prefix_tokens`` (tokens before the patches:
    CLS, registers, ...), ``has_cls`` (the first token is a CLS token), ``grid`` (the patch grid
    ``(h, w)`` at the configured image size, or None), ``feature_layer`` (the layer the tower's own
    features come from when the tower alone fixes it, else None), and implement :meth:`layer` (the
    module whose output is layer ``l``'s output), :meth:`tokens_in` (token count of layer 0's input)
    and :meth:`hook_attention` (hooks that call :meth:`Tap.record_qk` / :meth:`Tap.record_logits` /
    :meth:`Tap.record_keys` / :meth:`Tap.record` for layer ``l``). A packed tower (``packed = True``,
    no batch axis) also overrides :meth:`hook_tower` and :meth:`hidden`.
    """

    family: str = "?"
    num_layers: int = 0
    num_prefix_tokens: int = 0
    has_cls: bool = False
    grid: tuple[int, int] | None = None
    feature_layer: int | None = None
    packed: bool = False
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

    def hidden(self, out: Any, tap: Tap) -> Tensor:
        """The ``hidden`` signal of a layer from its module's output: patch tokens ``[B, N, D]``."""
        return self.layer_output(out)[:, tap.num_prefix_tokens:]

    def hook_tower(self, tap: Tap) -> list[RemovableHandle]:
        """Hooks on the whole tower (packed towers read their per-forward packing here)."""
        return []

    def hook_attention(self, l: int, want: frozenset[str], tap: Tap) -> list[RemovableHandle]:
        raise NotImplementedError


_QWEN_TOWERS = ("Qwen2VisionTransformerPretrainedModel", "Qwen2_5_VisionTransformerPretrainedModel",
                "Qwen3VLVisionModel", "Qwen3VLMoeVisionModel")


def _adapter_for(tower: nn.Module) -> TowerAdapter:
    """The adapter of ``tower``'s family, or :class:`UnsupportedModelError`."""
    if not isinstance(tower, nn.Module):
        raise UnsupportedModelError(f"attach() needs a vision tower (a torch.nn.Module), got {type(tower).__name__}")
    mod = type(tower).__module__ or ""
    if mod.startswith("transformers.") and type(tower).__name__ in _QWEN_TOWERS:
        from vtc.taps.qwen_vl import QwenVisionAdapter

        return QwenVisionAdapter(tower)
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
        "Hugging Face CLIPVisionModel / SiglipVisionModel (in LLaVA: model.model.vision_tower), the Qwen2-VL / "
        "Qwen2.5-VL / Qwen3-VL vision towers (model.model.visual), timm VisionTransformer, open_clip "
        "VisionTransformer (model.visual)."
    )


def _resolve(requires: Any, adapter: TowerAdapter, space: LayerSpace) -> dict[str, list[int]]:
    if hasattr(requires, "requires") and not isinstance(requires, Mapping):
        requires = requires.requires  # a Pipeline or an operator
    if not isinstance(requires, Mapping):
        raise TapError(
            f"requires must map a signal name to layer numbers, e.g. {{'cls_attn': [22]}}, got {type(requires).__name__}"
        )
    out: dict[str, list[int]] = {}
    for name, layers in requires.items():
        if name not in SIGNALS:
            raise TapError(f"taps cannot record the signal {name!r}; they record {', '.join(SIGNALS)}")
        if name in CLS_SIGNALS and not adapter.has_cls:
            raise TapError(
                f"this {adapter.family} tower has no CLS token, so it has no {name!r}. Its CLS-free signals are "
                f"'attn_received' (the attention each token receives, mean over all queries and heads) and "
                f"'key_norms' (per-token key L2 norm); 'keys' and 'hidden' work too. Use a method that scores by "
                "one of those, or one that needs no tower signal"
            )
        if isinstance(layers, (int, str)) or not isinstance(layers, Iterable):
            layers = [layers]
        resolved = space.resolve_all(layers, where=f"requires[{name!r}]")
        if resolved:
            out[name] = resolved
    return out


class Tap:
    """Hooks on a vision tower that record signals during its normal forward (module docstring).

    Use :func:`attach` to make one. :attr:`signals` holds the signals of the most recent forward
    (a new dict each forward); :meth:`clear` empties it, :meth:`remove` detaches every hook.
    :attr:`layer_space` is the tower's :class:`~vtc.taps.layers.LayerSpace`; :attr:`requires` the
    request resolved against it (non-negative layer numbers).
    """

    def __init__(self, tower: nn.Module, requires: Any, feature_layer: int | None = None,
                 max_chunk_elements: int | None = None) -> None:
        self.tower = tower
        self.adapter = _adapter_for(tower)
        a = self.adapter
        self.layer_space = LayerSpace(a.num_layers, a.feature_layer if feature_layer is None else feature_layer)
        self.requires: dict[str, list[int]] = _resolve(requires, a, self.layer_space)
        if max_chunk_elements is not None and (isinstance(max_chunk_elements, bool) or int(max_chunk_elements) < 1):
            raise TapError(f"max_chunk_elements must be a positive number of score elements, got {max_chunk_elements!r}")
        #: bound on the attention scores one chunk of query rows holds (``attn_received``)
        self.max_chunk_elements = None if max_chunk_elements is None else int(max_chunk_elements)
        self.signals: dict[str, dict[int, Tensor]] = {}
        self.num_tokens: int | None = None  # tokens (prefix included) seen in the last forward
        #: per-image token counts of the last forward of a packed tower (None for batched towers)
        self.image_token_counts: list[int] | None = None
        self._handles: list[RemovableHandle] = []
        per_layer: dict[int, set[str]] = {}
        for name, layers in self.requires.items():
            for l in layers:
                per_layer.setdefault(l, set()).add(name)
        try:
            self._handles.extend(a.hook_tower(self))
            self._handles.append(a.layer(0).register_forward_pre_hook(self._begin, with_kwargs=True))
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
    def packed(self) -> bool:
        """True for a packed tower (Qwen VL): signals are ``[S, ...]`` over the whole sequence."""
        return self.adapter.packed

    @property
    def num_patches(self) -> int | None:
        """Patch tokens per image in the most recent forward (None before the first; a packed
        tower: the whole sequence's)."""
        return None if self.num_tokens is None else self.num_tokens - self.num_prefix_tokens

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def resolve(self, layer: Layer) -> int:
        """``layer`` (a number, negative, ``"feature"`` or ``"last"``) as this tower's layer number."""
        return self.layer_space.resolve(layer)

    # ------------------------------------------------------------------ reading
    def signal(self, name: str, layer: Layer) -> Tensor:
        """The recorded signal ``name`` at ``layer`` (any layer form) from the last forward."""
        l = self.resolve(layer)
        per_layer = self.signals.get(name)
        if per_layer is None or l not in per_layer:
            have = {k: sorted(v) for k, v in self.signals.items()} or "none"
            raise TapError(
                f"the tap holds no {name!r} at layer {layer!r} (= {l}); it recorded {have} "
                f"{'in its last forward' if self.num_tokens is not None else '(no forward yet)'}; "
                f"attach it with {{{name!r}: [{layer!r}]}} and run the tower"
            )
        return per_layer[l]

    def per_image(self, name: str, layer: Layer) -> list[Tensor]:
        """Signal ``name`` at ``layer`` as one tensor per image, in the tower's token order.

        A batched tower gives row ``b`` of the ``[B, N, ...]`` signal; a packed tower (Qwen VL) splits
        the ``[S, ...]`` sequence into each image's ``t*h*w`` pre-merger patches, in the order the
        tower received them (see :func:`vtc.taps.qwen_vl.to_merged_grid` for the merged grid).
        """
        t = self.signal(name, layer)
        if self.image_token_counts is None:
            return list(t.unbind(0))
        return list(t.split(self.image_token_counts, dim=0))

    # ------------------------------------------------------------------ recording (called by adapters)
    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.num_tokens = self.adapter.tokens_in(args, kwargs)
        self.signals = {name: {} for name in self.requires}

    def _hidden_hook(self, l: int):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            self.record("hidden", l, self.adapter.hidden(out, self))

        return hook

    def record(self, name: str, l: int, value: Tensor) -> None:
        """Store signal ``name`` of layer ``l`` (detached)."""
        self.signals.setdefault(name, {})[l] = value.detach()

    def record_logits(self, l: int, want: frozenset[str], logits: Tensor, probs: Tensor) -> None:
        """Record ``cls_attn`` / ``cls_logits`` of layer ``l`` from the CLS row ``[B, H, N_all]``."""
        p = self.num_prefix_tokens
        if "cls_attn" in want:
            self.record("cls_attn", l, probs[:, :, p:].mean(1))
        if "cls_logits" in want:
            self.record("cls_logits", l, logits[:, :, p:].mean(1))

    def record_qk(self, l: int, want: frozenset[str], q_cls: Tensor | None, k: Tensor, scale: float,
                  q: Tensor | None = None) -> None:
        """Record layer ``l``'s signals from the keys ``k [B, H, N_all, d]``, the CLS query
        ``q_cls [B, H, d]`` (CLS signals) and all queries ``q [B, H, N_all, d]`` (``attn_received``),
        all as the attention uses them but unscaled; ``scale`` is the attention's scale."""
        k = k.detach()
        if q_cls is not None and want & CLS_SIGNALS:
            logits, probs = cls_attention(q_cls.detach(), k, scale)
            self.record_logits(l, want, logits, probs)
        if "keys" in want:
            self.record_keys(l, k[:, :, self.num_prefix_tokens:].mean(1))
        if "attn_received" in want:
            if q is None:
                raise TapError(f"layer {l}: attn_received needs every query row, but the adapter passed none")
            self.record_received(l, q.detach(), k, scale)
        if "key_norms" in want:
            self.record("key_norms", l, key_norms(k[:, :, self.num_prefix_tokens:]))

    def record_received(self, l: int, q: Tensor, k: Tensor, scale: float) -> None:
        """Record ``attn_received`` of layer ``l``: column mean over all ``q [B, H, N_all, d]`` rows, head-mean."""
        sums = received_attention(q, k, scale, self.max_chunk_elements)
        self.record("attn_received", l, sums[:, self.num_prefix_tokens:] / q.shape[2])

    def record_keys(self, l: int, keys: Tensor) -> None:
        """Record head-mean patch keys ``[B, N, d]`` of layer ``l``."""
        self.record("keys", l, keys)

    # ------------------------------------------------------------------ lifecycle
    def clear(self) -> None:
        """Forget the recorded signals (the hooks stay)."""
        self.signals = {}
        self.num_tokens = None
        self.image_token_counts = None

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


def attach(tower: nn.Module, requires: Any, *, feature_layer: int | None = None,
           max_chunk_elements: int | None = None) -> Tap:
    """Attach a :class:`Tap` recording ``requires`` (``{"cls_attn": [16, "feature"], "keys": [-2]}``) to ``tower``.

    ``requires`` has the form of :attr:`vtc.Pipeline.requires` (a Pipeline is accepted too); a layer
    is a number (negative counts from the end), ``"last"`` or ``"feature"``. ``feature_layer`` is the
    layer whose output the model uses as features (LLaVA-1.5: ``-2``; see
    :func:`vtc.taps.layers.hidden_state_layer` for a ``hidden_states`` index); a Qwen VL tower knows
    its own (the last layer), other towers need it only when ``"feature"`` is asked for.
    ``max_chunk_elements`` bounds the ``B*H*rows*N`` scores ``attn_received`` holds at once
    (default :data:`vtc.taps.received.MAX_CHUNK_ELEMENTS`). Raises
    :class:`~vtc.errors.UnsupportedModelError` for an unknown tower and :class:`~vtc.errors.TapError`
    for a layer that does not exist, an unknown signal, or a CLS signal on a tower without a CLS token.
    """
    return Tap(tower, requires, feature_layer=feature_layer, max_chunk_elements=max_chunk_elements)
