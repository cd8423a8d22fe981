"""The ``llm_layer`` stage: operators that drop visual tokens inside the language model.

An in-LLM operator (:class:`LayerOperator`) runs **after** each decoder layer it lists in
``layers=[...]`` (0-based; negative numbers count from the end, resolved against the model's
depth by :meth:`LayerOperator.resolve_layers`). There it sees a :class:`LayerContext` that the
model integration builds, and returns a ``[B, L]`` bool keep mask over the current sequence (or a
:class:`LayerUpdate` when it also adds tokens, as SparseVLM's recycling does). The integration then
removes the dropped visual tokens from the hidden states, the position embeddings, the attention
mask and the KV cache of every later layer. Text and padding are never dropped: the mask must be
true there (:meth:`LayerOperator.forward` checks it). FastV with ``K`` (scores from layer ``K-1``,
tokens dropped before layer ``K``) is ``layers=[K-1]`` in this convention.

The signal these methods rank by is the softmax attention of the layer, recomputed for just the
query rows a method needs from the post-RoPE queries and keys the layer's own attention call
computed (:class:`QKAttention`): causal and padding masked, grouped-query heads expanded, in
float32. The model keeps its fused attention (SDPA, FlashAttention); nothing needs
``attn_implementation="eager"`` or ``output_attentions=True``. Which rows each method asks for:

- FastV, PyramidDrop: the last prompt token's row (``ctx.last``), ``[B, H, 1, L]``;
- SparseVLM: the rows of its text raters;
- AIM: every row and column from the first visual token on (``attention_block``), the part of the
  map its PageRank needs (causality makes the earlier rows irrelevant to the later columns).

A learned scorer (p-MoD / ATP-LLaVA style routers) is just another :class:`LayerOperator` that
reads ``ctx.hidden`` and sets ``needs_attention = False`` (:mod:`vtc.ops.router`).

For the model integration (:mod:`vtc.integrations.llm_layer` implements it for every adapter) the
whole contract is, at prefill:

1. ``schedule = pipeline.layer_schedule(num_layers)``; one ``state = {}`` per operator;
2. in the attention call of each scheduled layer where some operator ``needs_attention``, keep
   the post-RoPE ``query [B, H, L, d]``, ``key [B, H_kv, L, d]`` and ``scaling`` the call receives
   (transformers' ``AttentionInterface`` sees exactly these; the model's own kernel still runs);
3. after the layer, for each operator in order: ``ctx = LayerContext.from_qk(q, k, layer=l,
   num_layers=T, hidden=layer_output, visual=..., valid=..., index=..., last=..., visual_in=...,
   scale=scaling, embeds=... if op.needs_embeds, state=state[op])``, ``out = op(ctx)``;
4. apply ``out`` (a keep mask, or a :class:`LayerUpdate`) to the hidden states, positions
   (``op.position_ids``), the mask and the KV cache of the later layers. Decode steps never call
   the operators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from vtc.errors import ConfigError, InputError
from vtc.ops.base import OpConfig, Operator
from vtc.ops.selection import descending_order, mask_from_order

__all__ = ["QKAttention", "LayerContext", "LayerUpdate", "LayerConfig", "LayerOperator", "keep_top_visual",
           "text_after_visual"]


# ---------------------------------------------------------------------------------------- signal
@dataclass
class QKAttention:
    """Softmax attention of one decoder layer for chosen query rows, from its post-RoPE q and k.

    ``q [B, H, L, d]`` and ``k [B, H_kv, L, d]`` are what the layer's attention call received
    (after the rotary embedding, before scaling; ``H`` a multiple of ``H_kv``: head ``h`` reads
    key head ``h // (H // H_kv)``, as ``repeat_kv`` does). ``scale`` is the attention's scaling
    (``d ** -0.5`` for Llama / Qwen2). ``valid [B, L]`` marks real tokens: a query attends to
    the valid keys at or before its own position (causal + padding mask). Everything is computed
    in float32 and only for the requested rows: ``[B, H, R, L]`` scores, never the ``L x L`` map
    unless every row is asked for.
    """

    q: Tensor
    k: Tensor
    scale: float
    valid: Tensor

    def __post_init__(self) -> None:
        q, k = self.q, self.k
        if q.dim() != 4 or k.dim() != 4:
            raise InputError(f"q and k must be [B, H, L, d] tensors, got {tuple(q.shape)} and {tuple(k.shape)}")
        B, H, L, d = q.shape
        if k.shape[0] != B or k.shape[2] != L or k.shape[3] != d:
            raise InputError(
                f"k {tuple(k.shape)} does not match q {tuple(q.shape)}: both are [B, heads, L, head_dim] over the "
                "same tokens (a prefill; in-LLM operators do not run on decode steps)"
            )
        if H % k.shape[1]:
            raise InputError(f"{H} query heads are not a multiple of {k.shape[1]} key/value heads")
        if tuple(self.valid.shape) != (B, L) or self.valid.dtype != torch.bool:
            raise InputError(f"valid must be a [B={B}, L={L}] bool tensor, got {self.valid.dtype} {tuple(self.valid.shape)}")

    def rows(self, rows: Tensor, temperature: float = 1.0) -> Tensor:
        """``[B, H, R, L]`` float32 ``softmax(q_r kᵀ · scale / temperature)`` for positions ``rows [B, R]``.

        Entries of ``rows`` that are negative, or point at padding, give rows of zeros.
        """
        B, H, L, d = self.q.shape
        Hkv = self.k.shape[1]
        rows = _as_rows(rows, B, L)
        R = rows.shape[1]
        r = rows.clamp(0, L - 1)
        qr = self.q.gather(2, r.view(B, 1, R, 1).expand(B, H, R, d)).float()
        scores = torch.matmul(qr.view(B, Hkv, H // Hkv, R, d), self.k.float().unsqueeze(2).transpose(-1, -2))
        scores = scores.view(B, H, R, L) * self.scale
        if temperature != 1.0:
            scores = scores / temperature
        pos = torch.arange(L, device=r.device)
        allowed = self.valid.unsqueeze(1) & (pos.view(1, 1, L) <= r.unsqueeze(2))  # [B, R, L]
        live = (rows >= 0) & self.valid.gather(1, r)  # [B, R]
        allowed = allowed & live.unsqueeze(2)
        scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return probs.masked_fill(~live.view(B, 1, R, 1), 0.0)

    def block(self, rows: Tensor, cols: Tensor, temperature: float = 1.0) -> Tensor:
        """``[B, H, R, C]``: columns ``cols [B, C]`` of :meth:`rows` (each row normalised over all keys).

        Negative entries of ``cols`` give columns of zeros.
        """
        B, H, L, _ = self.q.shape
        cols = _as_rows(cols, B, L)
        p = self.rows(rows, temperature)
        C = cols.shape[1]
        out = p.gather(3, cols.clamp(0, L - 1).view(B, 1, 1, C).expand(B, H, p.shape[2], C))
        return out.masked_fill((cols < 0).view(B, 1, 1, C), 0.0)


def _as_rows(rows: Tensor, B: int, L: int) -> Tensor:
    if not isinstance(rows, Tensor) or rows.is_floating_point() or rows.dtype == torch.bool:
        raise InputError("attention rows/columns must be an integer tensor of positions")
    rows = rows.long()
    if rows.dim() == 1:
        rows = rows.unsqueeze(1)
    if rows.dim() != 2 or rows.shape[0] != B:
        raise InputError(f"attention rows/columns must be [B={B}, R] positions, got shape {tuple(rows.shape)}")
    if bool((rows >= L).any()):
        raise InputError(f"attention rows/columns point past the sequence of {L} tokens")
    return rows


# ---------------------------------------------------------------------------------------- context
@dataclass
class LayerContext:
    """What an in-LLM operator sees after decoder layer ``layer`` (see the module docstring).

    - ``layer`` (0-based, resolved) and ``num_layers`` of the decoder;
    - ``hidden [B, L, D]``: the output of layer ``layer`` for the current (already compacted)
      sequence; ``visual [B, L]`` bool: positions holding visual tokens still alive; ``valid [B, L]``
      bool: not padding; ``index [B, L]`` long: the visual token's number among the visual tokens
      the LLM received (0-based; ``-1`` for text), so kept tokens can be named across layers;
      ``last [B]`` long: position of the last prompt token;
    - ``visual_in [B]`` long: visual tokens the LLM received (PyramidDrop's and AIM's ratios are
      fractions of it);
    - ``attention``: the layer's :class:`QKAttention` (None when no operator at this layer needs it);
    - ``embeds [B, L, D]`` (optional): the LLM's input embeddings of the current positions (SparseVLM
      chooses its text raters from them);
    - ``state``: a dict private to one operator for one forward pass (the integration gives each
      operator a fresh one per prefill and the same one at each of its layers), for what a method
      decides at its first layer and reuses at the later ones.
    """

    layer: int
    num_layers: int
    hidden: Tensor
    visual: Tensor
    valid: Tensor
    index: Tensor
    last: Tensor
    visual_in: Tensor
    attention: QKAttention | None = None
    embeds: Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hidden.dim() != 3:
            raise InputError(f"LayerContext.hidden must be [B, L, D], got shape {tuple(self.hidden.shape)}")
        B, L = self.hidden.shape[:2]
        for name in ("visual", "valid"):
            t = getattr(self, name)
            if tuple(t.shape) != (B, L) or t.dtype != torch.bool:
                raise InputError(f"LayerContext.{name} must be a [B={B}, L={L}] bool tensor, got {t.dtype} {tuple(t.shape)}")
        if tuple(self.index.shape) != (B, L):
            raise InputError(f"LayerContext.index must be [B={B}, L={L}], got {tuple(self.index.shape)}")
        for name in ("last", "visual_in"):
            if tuple(getattr(self, name).shape) != (B,):
                raise InputError(f"LayerContext.{name} must be [B={B}], got {tuple(getattr(self, name).shape)}")
        if bool((self.visual & ~self.valid).any()):
            raise InputError("LayerContext.visual marks padding positions; visual tokens are valid tokens")
        if not 0 <= self.layer < self.num_layers:
            raise InputError(f"LayerContext.layer {self.layer} is outside the decoder's {self.num_layers} layers")

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def length(self) -> int:
        return self.hidden.shape[1]

    @property
    def visual_counts(self) -> Tensor:
        """``[B]`` long: visual tokens alive in each sequence."""
        return self.visual.sum(1)

    def _attn(self) -> QKAttention:
        if self.attention is None:
            raise InputError(
                f"decoder layer {self.layer}: this operator reads attention, but the integration captured no q/k "
                "for the layer (an operator with needs_attention=True is at this layer)"
            )
        return self.attention

    def attention_rows(self, rows: Tensor, temperature: float = 1.0) -> Tensor:
        """``[B, H, R, L]`` float32 softmax probabilities of this layer for query positions ``rows [B, R]``."""
        return self._attn().rows(rows, temperature)

    def attention_block(self, rows: Tensor, cols: Tensor, temperature: float = 1.0) -> Tensor:
        """``[B, H, R, C]``: the sub-block ``rows x cols`` of the softmax map (rows normalised over all keys)."""
        return self._attn().block(rows, cols, temperature)

    @classmethod
    def from_qk(
        cls,
        q: Tensor | None,
        k: Tensor | None,
        *,
        layer: int,
        num_layers: int,
        hidden: Tensor,
        visual: Tensor,
        valid: Tensor | None = None,
        index: Tensor | None = None,
        last: Tensor | None = None,
        visual_in: Tensor | None = None,
        scale: float | None = None,
        embeds: Tensor | None = None,
        state: dict[str, Any] | None = None,
    ) -> LayerContext:
        """Build the context from the post-RoPE ``q [B, H, L, d]`` / ``k [B, H_kv, L, d]`` of layer ``layer``.

        Defaults: ``valid`` all true; ``scale`` ``d ** -0.5``; ``last`` the last valid position;
        ``index`` the running count of visual positions (``-1`` on text), right for a sequence
        from which nothing was dropped yet; ``visual_in`` the visual tokens present. ``q``/``k`` may
        be None for operators that do not read attention.
        """
        B, L = hidden.shape[:2]
        dev = hidden.device
        if not isinstance(visual, Tensor) or visual.dtype != torch.bool:
            raise InputError(f"visual must be a [B, L] bool tensor, got {getattr(visual, 'dtype', type(visual))}")
        if valid is None:
            valid = torch.ones(B, L, dtype=torch.bool, device=dev)
        if index is None:
            index = torch.where(visual, torch.cumsum(visual.long(), 1) - 1, torch.full_like(visual, -1, dtype=torch.long))
        if last is None:
            pos = torch.arange(L, device=dev).expand(B, L)
            last = torch.where(valid, pos, torch.full_like(pos, -1)).max(1).values
        if visual_in is None:
            visual_in = visual.sum(1)
        attention = None
        if q is not None and k is not None:
            attention = QKAttention(q, k, q.shape[-1] ** -0.5 if scale is None else float(scale), valid)
        elif (q is None) != (k is None):
            raise InputError("give both q and k, or neither")
        return cls(layer=layer, num_layers=num_layers, hidden=hidden, visual=visual, valid=valid, index=index,
                   last=last, visual_in=visual_in, attention=attention, embeds=embeds,
                   state={} if state is None else state)


@dataclass
class LayerUpdate:
    """An operator's decision when it also adds tokens (SparseVLM's recycled cluster tokens).

    ``keep [B, L]`` as for a plain mask. ``add [B, E, D]`` new hidden states (``add_valid [B, E]``
    marks real ones, left-packed), inserted in order right after position ``add_after [B]`` (a kept
    visual position) of the current sequence; they are visual tokens (later layers may drop them)
    whose ``index`` is ``add_index [B, E]``. Their position ids are the integration's policy
    (:attr:`LayerOperator.position_ids`; under ``"original"`` they take the id of the token they follow).
    """

    keep: Tensor
    add: Tensor | None = None
    add_valid: Tensor | None = None
    add_after: Tensor | None = None
    add_index: Tensor | None = None

    @property
    def added(self) -> Tensor:
        """``[B]`` long: tokens added per sequence."""
        if self.add is None:
            return torch.zeros(self.keep.shape[0], dtype=torch.long, device=self.keep.device)
        return self.add_valid.sum(1) if self.add_valid is not None else torch.full(
            (self.keep.shape[0],), self.add.shape[1], dtype=torch.long, device=self.keep.device)


# ---------------------------------------------------------------------------------------- operators
@dataclass
class LayerConfig(OpConfig):
    """``layers``: decoder layers after which the operator runs (None: the method's default; negative
    numbers count from the end). ``position_ids``: ``"original"`` (survivors keep their position ids,
    with gaps) or ``"contiguous"`` (renumbered); None: the method's official choice."""

    layers: list[int] | None = None
    position_ids: Literal["original", "contiguous"] | None = None


class LayerOperator(Operator):
    """Base of the ``llm_layer`` operators (see the module docstring).

    Subclasses implement :meth:`decide` (the keep mask at one layer) and :meth:`kept_visual` (how
    many visual tokens survive it, the count both :meth:`decide` and the FLOPs model use), and may
    override :meth:`default_layers`.
    """

    Config: ClassVar[type] = LayerConfig
    default_stage: ClassVar[str] = "llm_layer"
    #: whether the operator reads the layer's attention (the integration then captures q/k there)
    needs_attention: ClassVar[bool] = True
    #: whether the operator reads ``ctx.embeds`` (the LLM input embeddings of the current positions)
    needs_embeds: ClassVar[bool] = False
    #: the method's own position-id policy after dropping (``"original"`` or ``"contiguous"``)
    default_position_ids: ClassVar[str] = "original"

    @property
    def position_ids(self) -> str:
        """The position-id policy the operator wants the integration to apply."""
        return self.config.position_ids or self.default_position_ids

    def default_layers(self, num_layers: int) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The decoder layers (0-based, increasing, distinct) after which this operator runs."""
        if num_layers <= 0:
            raise ConfigError(f"a decoder has at least one layer, got num_layers={num_layers}")
        layers = self.config.layers if self.config.layers is not None else self.default_layers(num_layers)
        out = []
        for l in layers:
            r = l + num_layers if l < 0 else l
            if not 0 <= r < num_layers:
                raise ConfigError(
                    f"operator {self.name!r}: layer {l} does not exist in a {num_layers}-layer language model "
                    f"(valid: 0..{num_layers - 1} or -{num_layers}..-1); set layers= for this model"
                )
            out.append(r)
        if len(set(out)) != len(out):
            raise ConfigError(f"operator {self.name!r}: layers {layers} name a decoder layer twice")
        return sorted(out)

    def kept_visual(self, layer: int, alive: Tensor, visual_in: Tensor, num_layers: int) -> Tensor:  # pragma: no cover
        """``[B]`` long: visual tokens alive after this operator runs at ``layer`` (added ones included),
        given ``alive [B]`` before it and ``visual_in [B]`` at the LLM input."""
        raise NotImplementedError

    def decide(self, ctx: LayerContext) -> Tensor | LayerUpdate:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, ctx: LayerContext) -> Tensor | LayerUpdate:  # type: ignore[override]
        """The keep mask ``[B, L]`` (or a :class:`LayerUpdate`) after layer ``ctx.layer``."""
        if not isinstance(ctx, LayerContext):
            raise ConfigError(
                f"operator {self.name!r} runs inside the language model (stage 'llm_layer') and is called with a "
                f"LayerContext, not {type(ctx).__name__}; attach it with vtc.apply on a model whose integration "
                "supports in-LLM operators"
            )
        if ctx.layer not in self.resolve_layers(ctx.num_layers):
            raise InputError(f"operator {self.name!r} does not run after decoder layer {ctx.layer}")
        out = self.decide(ctx)
        keep = out.keep if isinstance(out, LayerUpdate) else out
        if tuple(keep.shape) != (ctx.batch_size, ctx.length) or keep.dtype != torch.bool:
            raise InputError(f"operator {self.name!r} returned a keep mask of {keep.dtype} {tuple(keep.shape)}")
        if bool((~keep & ~ctx.visual).any()):
            raise InputError(f"operator {self.name!r} tried to drop text or padding after layer {ctx.layer}")
        return out


def keep_top_visual(ctx: LayerContext, scores: Tensor, k: Tensor) -> Tensor:
    """``[B, L]`` keep mask: every non-visual position, plus the ``k[b]`` alive visual tokens with the
    highest ``scores [B, L]`` (ties: the earlier position)."""
    order = descending_order(scores.float(), ctx.visual)
    chosen = mask_from_order(order, torch.minimum(k.long(), ctx.visual_counts))
    return (chosen & ctx.visual) | ~ctx.visual


def text_after_visual(ctx: LayerContext) -> Tensor:
    """``[B, L]`` bool: valid text positions after the last alive visual token, up to ``last``."""
    B, L = ctx.visual.shape
    pos = torch.arange(L, device=ctx.visual.device).expand(B, L)
    last_vis = torch.where(ctx.visual, pos, torch.full_like(pos, -1)).max(1).values
    return ctx.valid & ~ctx.visual & (pos > last_vis.unsqueeze(1)) & (pos <= ctx.last.unsqueeze(1))


def floor_count(n: Tensor, fraction: float) -> Tensor:
    """``int(n * fraction)`` per entry, as Python's ``int()`` of the float product (a tiny epsilon
    absorbs products like ``0.7 * 10 = 6.999...``)."""
    return torch.floor(n.double() * fraction + 1e-9).long()


def scaled_layers(reference: list[int], reference_depth: int, num_layers: int) -> list[int]:
    """``reference`` layers of a ``reference_depth``-layer model scaled to ``num_layers``: ``int(l*T/T0)``."""
    return [int(math.floor(l * num_layers / reference_depth)) for l in reference]
