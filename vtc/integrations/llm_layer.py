"""The ``llm_layer`` stage inside a model's decoder: run in-LLM operators and drop what they drop.

The seam (no transformers forward body is copied; every model keeps its own attention kernel):

- **q/k after RoPE** come from the model's own attention call, through transformers'
  ``AttentionInterface``: the attention modules of the layers where some operator
  ``needs_attention`` see a view of their config whose ``_attn_implementation`` is
  :data:`CAPTURE`, a registered function that keeps the ``query`` / ``key`` it receives (at a
  prefill) and delegates to the implementation the model was configured with (SDPA,
  FlashAttention, flex, eager), with the module's own config in place. Nothing needs
  ``attn_implementation="eager"`` or ``output_attentions=True``.
- **After each scheduled layer** a forward hook on the decoder layer builds a
  :class:`~vtc.ops.llm_layer.LayerContext` (``LayerContext.from_qk``), calls the operators in
  pipeline order, and returns the layer's output with the dropped visual positions removed and
  :class:`~vtc.ops.llm_layer.LayerUpdate` tokens inserted, re-padded on the side the batch is
  padded on. Text and padding are never dropped (the operator base refuses it).
- **Every later layer** gets, through a forward pre-hook that rewrites its keyword arguments, the
  position embeddings of the surviving tokens (gathered from the model's own ``(cos, sin)`` under
  the operator's ``position_ids="original"`` policy; recomputed by the adapter for renumbered
  ids under ``"contiguous"``), their ``position_ids`` and an attention mask built by the model's own
  ``create_causal_mask`` for that layer's length (``layer_idx=``: the KV cache holds a different
  length per layer).
- **The KV cache** is the model's ``DynamicCache``: each layer caches the keys and values of the
  tokens it processed, so after a prefill layer ``l`` holds its own length and decoding extends
  every layer by one; beam search reorders every layer along the batch
  (``Cache.reorder_cache``). At a decoding step the pre-hooks give each layer after a drop the
  mask over its own cache (the compacted prompt mask of its segment followed by the model's mask
  over the new tokens), and, after a ``"contiguous"`` drop, position ids shifted by the tokens
  removed, so new tokens follow the surviving ones without a gap. Static (compileable) caches
  are refused.
- **The language model's output** is scattered back onto the positions it received (a forward
  hook on the decoder stack): logits and labels stay aligned with the compacted prompt
  (``handle.last.positions``); a position dropped inside the model gets a zero final hidden
  state (its logits are the LM head's bias), recycled tokens have no position there.
- Families whose decoder adds per-position features after some layers (Qwen3-VL's DeepStack)
  map them onto the surviving positions with :meth:`LayerStage.follow` (the adapter's
  :meth:`~vtc.integrations.adapters.ModelAdapter.follow_layer_drops`).

A prefill that repeats the previous prefill's ``pixel_values`` tensor and extends its
``input_ids`` (what ``generate(use_cache=False)`` sends at every step) is a continuation: the
operators decide on the prompt part only (the extra tokens stay, at the end of every row), so an
uncached ``generate`` drops exactly the tokens a cached one does. Operators run at prefills
only; decoding steps reuse the pruned cache.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vtc.errors import ConfigError, InputError, UnsupportedModelError
from vtc.integrations.kv_cache import cache_in
from vtc.ops.llm_layer import LayerContext, LayerUpdate

if TYPE_CHECKING:
    from vtc.integrations.adapters.base import ModelAdapter
    from vtc.integrations.handle import Handle
    from vtc.pipeline import Pipeline

__all__ = ["CAPTURE", "LayerStage"]

#: the attention implementation name the captured layers' attention modules see
CAPTURE = "vtc_capture"
#: attention module -> its recorder (the registered function finds it here)
_CAPTURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_registered = False


# ---------------------------------------------------------------------------------------- q/k capture
def _capture_attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs: Any):
    """The registered attention function: record q/k, then run the module's configured implementation."""
    rec = _CAPTURES.get(module)
    if rec is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} asks for vtc's q/k capture but vtc.apply did not set it up on this module; "
            "remove() the handle that attached it")
    return rec(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(CAPTURE, _capture_attention)
        _registered = True


class _ConfigView:
    """The attention module's config, except that it names :data:`CAPTURE` as the implementation."""

    _attn_implementation = CAPTURE

    def __init__(self, config: Any) -> None:
        object.__setattr__(self, "_config", config)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._config, name, value)


class _Recorder:
    """Keeps the post-RoPE ``query`` / ``key`` of one attention module while armed."""

    def __init__(self, module: Any) -> None:
        self.config = module.config
        self.view = _ConfigView(self.config)
        self.armed = False
        self.q: Tensor | None = None
        self.k: Tensor | None = None
        self.scale: float | None = None

    def delegate(self, module: Any) -> Any:
        name = self.config._attn_implementation
        if name in (None, "eager"):
            fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
            if fn is None:
                raise UnsupportedModelError(f"cannot find the eager attention of {type(module).__name__}; "
                                            "load the model with attn_implementation='sdpa'")
            return fn
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS[name]

    def __call__(self, module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs: Any):
        if self.armed:
            self.q, self.k, self.scale = query, key, kwargs.get("scaling")
        fn = self.delegate(module)
        module.__dict__["config"] = self.config  # the implementation may read its name there (flash kernels)
        try:
            return fn(module, query, key, value, attention_mask, **kwargs)
        finally:
            module.__dict__["config"] = self.view

    def take(self) -> tuple[Tensor | None, Tensor | None, float | None]:
        out = self.q, self.k, self.scale
        self.q = self.k = self.scale = None
        return out


# ---------------------------------------------------------------------------------------- the sequence
@dataclass
class _Segment:
    """The sequence the layers after a drop process (every tensor ``[B, L]`` unless noted).

    ``src0``: the column of the language model's input each slot holds (-1: padding or an added
    token); ``prompt``: the leading columns that are the prompt (the rest: a continuation's
    generated tokens); ``cos``/``sin`` ``[B, L, d]``: the rotary embeddings the layers receive;
    ``ids``: their ``position_ids`` keyword (``[B, L]``, or None when the model passes none);
    ``shift [B]``: how far a token after the prompt's end moves back (``"contiguous"`` drops).
    """

    src0: Tensor
    valid: Tensor
    visual: Tensor
    index: Tensor
    prompt: int
    cos: Tensor
    sin: Tensor
    ids: Tensor | None
    shift: Tensor
    embeds: Tensor | None = None
    masks: dict[Any, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def last(self) -> Tensor:
        """``[B]``: the last valid prompt position."""
        v = self.valid[:, : self.prompt]
        pos = torch.arange(v.shape[1], device=v.device).expand_as(v)
        return torch.where(v, pos, torch.full_like(pos, -1)).max(1).values.clamp_min(0)


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """``t [B, L, ...]`` gathered along dim 1 at ``idx [B, K]`` (entries >= 0)."""
    shape = (*idx.shape, *t.shape[2:])
    return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(shape))


def _repack(alive: Tensor, key: Tensor, left: bool) -> Tensor:
    """``[B, K]`` item numbers of each row's alive items ordered by ``key``, padded with -1 on the left
    (``left``) or right; ``K`` the largest alive count."""
    big = torch.iinfo(torch.long).max
    order = torch.sort(torch.where(alive, key, torch.full_like(key, big)), dim=1, stable=True).indices
    n = alive.sum(1)
    K = int(n.max().item()) if n.numel() else 0
    slot = torch.arange(K, device=alive.device).unsqueeze(0)
    if left:
        j = slot - (K - n).unsqueeze(1)
        ok = j >= 0
        out = order.gather(1, j.clamp_min(0))
    else:
        ok = slot < n.unsqueeze(1)
        out = order[:, :K]
    return torch.where(ok, out, torch.full_like(out, -1))


# ---------------------------------------------------------------------------------------- decode state
@dataclass
class _CacheLayout:
    """What decoding over a KV cache filled by an in-LLM-pruned prefill needs, per segment."""

    prompt0: int  # the prompt length in the cache of the layers before the first drop
    valid: list[Tensor]  # per segment: [B, P_s] the compacted prompt mask of its layers' caches
    shift: list[Tensor]  # per segment: [B] position shift of new tokens
    segment: list[int]  # per layer: its segment
    shifted: list[bool] = field(default_factory=list)  # per segment: any shift (read once, not per step)


@dataclass
class _Prefill:
    """One prefill in progress."""

    ids: Tensor
    valid: Tensor | None
    prompt: int
    states: dict[int, dict] = field(default_factory=dict)
    segments: list[_Segment] = field(default_factory=list)
    segment_of: list[int] = field(default_factory=list)
    layer_visual: list[Tensor] = field(default_factory=list)
    kept: dict[int, list[Tensor]] = field(default_factory=dict)
    visual_in: Tensor | None = None

    @property
    def current(self) -> _Segment:
        return self.segments[-1]


@dataclass
class _Decode:
    layout: _CacheLayout
    mask: Tensor | None  # [B, P0 + new + q] the 2-D mask the model got (None: all ones)
    made: dict[Any, Any] = field(default_factory=dict)  # per (segment, mask kind): what this step built


# ---------------------------------------------------------------------------------------- the stage
class LayerStage:
    """Runs a pipeline's ``llm_layer`` operators inside one model's decoder (see the module docstring)."""

    def __init__(self, adapter: ModelAdapter, pipeline: Pipeline, handle: Handle) -> None:
        self.adapter = adapter
        self.num_layers = adapter.num_layers
        self.schedule = pipeline.layer_schedule(self.num_layers)
        self.ops = pipeline.stage_ops("llm_layer")
        #: each operator's position-id policy here: its own, or, when the operator was not told one and
        #: its method's default is undefined for this model (SparseVLM's renumbering under M-RoPE), the
        #: model's first mode; asking explicitly for an unsupported one is an error
        self.position_policy: dict[int, str] = {}
        for op in self.ops:
            policy = op.position_ids
            if policy not in adapter.position_modes:
                if op.config.position_ids is not None:
                    raise ConfigError(
                        f"operator {op.name!r} renumbers positions ({policy!r}) after it drops tokens, which "
                        f"{type(adapter.model).__name__} does not support (position ids: {adapter.position_modes}); "
                        f"configure it with position_ids={adapter.position_modes[0]!r}")
                policy = adapter.position_modes[0]
            self.position_policy[id(op)] = policy
        self.config = adapter.language_model.config
        from transformers import masking_utils

        if "layer_idx" not in _params(masking_utils.create_causal_mask):
            import transformers

            raise UnsupportedModelError(
                f"in-LLM operators size each decoder layer's mask by its own KV cache (create_causal_mask(layer_idx=)), "
                f"which transformers {transformers.__version__} lacks; use transformers 5.24 or later")
        self.needs_embeds = any(op.needs_embeds for op in self.ops)
        self.run: _Prefill | None = None
        self.decoding: _Decode | None = None
        self.layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.last: dict[str, Any] | None = None  # the last prefill's _summary
        _register()
        self.recorders: dict[int, _Recorder] = {}
        for layer, ops in self.schedule.items():
            if any(op.needs_attention for op in ops):
                attn = adapter.attention(layer)
                rec = _Recorder(attn)
                self.recorders[layer] = rec
                _CAPTURES[attn] = rec
                handle.on_remove(lambda a=attn: _CAPTURES.pop(a, None))
                handle.set_attr(attn, "config", rec.view)
        for layer, module in enumerate(adapter.decoder_layers):
            h = module.register_forward_pre_hook(self._pre_hook(layer), with_kwargs=True)
            handle.on_remove(h.remove)
            if layer in self.schedule:
                h = module.register_forward_hook(self._post_hook(layer), with_kwargs=True)
                handle.on_remove(h.remove)
        h = adapter.language_model.register_forward_hook(self._output_hook)
        handle.on_remove(h.remove)
        adapter.follow_layer_drops(self, handle)

    # ------------------------------------------------------------------ the wrapper's calls
    @contextlib.contextmanager
    def prefill(self, ids: Tensor, valid: Tensor | None, prompt: int, cache: Any) -> Iterator[None]:
        """Run the operators during the model call inside this block (``ids``: the compacted
        ``input_ids``; ``valid``: their 2-D attention mask; ``prompt``: how many leading columns are
        the prompt; ``cache``: the KV cache passed, if any)."""
        if cache is not None and getattr(cache, "is_compileable", False):
            raise InputError(
                "in-LLM operators give each decoder layer its own KV cache length, which a static (compileable) "
                f"cache ({type(cache).__name__}) cannot hold; use the default dynamic cache")
        self.run = _Prefill(ids=ids, valid=None if valid is None else valid.bool(), prompt=prompt,
                            states={id(op): {} for op in self.ops})
        for rec in self.recorders.values():
            rec.armed = True
        try:
            yield
            self.last = self._summary(self.run)
        finally:
            for rec in self.recorders.values():
                rec.armed = False
                rec.take()
            self.run = None

    @staticmethod
    def _summary(run: _Prefill) -> dict[str, Any]:
        """What outlives a prefill: its report and, if it dropped tokens, the decoding layout."""
        out: dict[str, Any] = {}
        if run.layer_visual:
            out["report"] = {"layer_visual": torch.stack(run.layer_visual, 1).tolist(), "layer_kept": dict(run.kept)}
        if len(run.segments) > 1:
            out["layout"] = _CacheLayout(
                prompt0=run.segments[0].length, valid=[s.valid[:, : s.prompt] for s in run.segments],
                shift=[s.shift for s in run.segments], segment=list(run.segment_of),
                shifted=[bool((s.shift != 0).any()) for s in run.segments])
        return out

    def remember(self, cache: Any) -> None:
        """Keep what decoding over ``cache`` (filled by the last prefill) needs."""
        layout = (self.last or {}).get("layout")
        if cache is not None and layout is not None:
            self.layouts[cache] = layout

    @contextlib.contextmanager
    def decode(self, cache: Any, mask: Tensor | None) -> Iterator[None]:
        """Give the layers their own masks (and shifted positions) during a decoding call over ``cache``."""
        layout = self.layouts.get(cache) if cache is not None else None
        if layout is None:
            yield
            return
        self.decoding = _Decode(layout, mask)
        try:
            yield
        finally:
            self.decoding = None

    def report(self) -> dict[str, Any]:
        """The last prefill's per-layer facts for ``handle.last.extra``: ``layer_visual`` (per row, the
        visual tokens each decoder layer processed) and ``layer_kept`` (per scheduled layer, per row,
        the ``index`` of the visual tokens alive after it, in sequence order)."""
        return dict((self.last or {}).get("report", {}))

    # ------------------------------------------------------------------ family hooks
    def follow(self, mask0: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Features attached to positions of the language model's input (``mask0 [B, L0]`` marks them,
        ``rows [n, D]`` in row-major order of its true entries), mapped onto the current sequence:
        ``(mask [B, L], rows [m, D])``. Unchanged outside a prefill or before the first drop."""
        run = self.run
        if run is None or len(run.segments) <= 1:
            return mask0, rows
        seg = run.current
        m0 = mask0.to(seg.src0.device).bool()
        rank0 = (torch.cumsum(m0.reshape(-1).long(), 0) - 1).view(m0.shape)
        at = seg.src0.clamp_min(0)
        here = (seg.src0 >= 0) & m0.gather(1, at)
        return here, rows[rank0.gather(1, at)[here].to(rows.device)]

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, layer: int):
        def hook(module: Any, args: tuple, kwargs: dict) -> Any:
            if self.run is not None:
                return self._prefill_kwargs(layer, args, kwargs)
            if self.decoding is not None:
                return self._decode_kwargs(layer, args, kwargs)
            return None

        return hook

    def _post_hook(self, layer: int):
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
            if self.run is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            new = self._run_ops(layer, hidden)
            if new is hidden:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def _output_hook(self, module: Any, args: tuple, output: Any) -> Any:
        run = self.run
        if run is None or len(run.segments) <= 1:
            return None
        seg, first = run.current, run.segments[0]
        tuple_out = isinstance(output, tuple)
        hidden = output[0] if tuple_out else output.last_hidden_state
        B, L0 = first.valid.shape
        full = hidden.new_zeros(B, L0 + 1, hidden.shape[-1])
        dst = torch.where(seg.src0 >= 0, seg.src0, torch.full_like(seg.src0, L0))
        full.scatter_(1, dst.unsqueeze(-1).expand(*dst.shape, hidden.shape[-1]), hidden)
        full = full[:, :L0]
        if tuple_out:
            return (full, *output[1:])
        output.last_hidden_state = full
        return output

    # ------------------------------------------------------------------ prefill
    def _hidden_arg(self, args: tuple, kwargs: dict) -> Tensor:
        return args[0] if args else kwargs["hidden_states"]

    def _first_segment(self, hidden: Tensor, kwargs: dict) -> _Segment:
        run = self.run
        B, L = hidden.shape[:2]
        dev = hidden.device
        valid = run.valid.to(dev) if run.valid is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
        if tuple(valid.shape) != (B, L) or tuple(run.ids.shape) != (B, L):
            raise InputError(f"the language model received {B}x{L} hidden states but the prompt is "
                             f"{tuple(run.ids.shape)}; vtc cannot follow this model's input")
        visual = (run.ids.to(dev) == self.adapter.image_token_id) & valid
        visual[:, run.prompt:] = False
        index = torch.where(visual, torch.cumsum(visual.long(), 1) - 1, torch.full_like(visual, -1, dtype=torch.long))
        run.visual_in = visual.sum(1)
        cos, sin = kwargs["position_embeddings"]
        ids = kwargs.get("position_ids")
        if ids is not None:
            ids = ids.expand(B, L) if ids.dim() == 2 else None
        return _Segment(src0=torch.arange(L, device=dev).expand(B, L), valid=valid, visual=visual, index=index,
                        prompt=run.prompt, cos=cos.expand(B, *cos.shape[1:]), sin=sin.expand(B, *sin.shape[1:]),
                        ids=ids, shift=torch.zeros(B, dtype=torch.long, device=dev),
                        embeds=hidden if self.needs_embeds else None)

    def _prefill_kwargs(self, layer: int, args: tuple, kwargs: dict) -> Any:
        run = self.run
        if not run.segments:
            run.segments.append(self._first_segment(self._hidden_arg(args, kwargs), kwargs))
        seg = run.current
        run.segment_of.append(len(run.segments) - 1)
        run.layer_visual.append(seg.visual[:, : seg.prompt].sum(1))
        if len(run.segments) == 1:
            return None
        hidden = self._hidden_arg(args, kwargs)
        kw = dict(kwargs)
        kw["position_embeddings"] = (seg.cos, seg.sin)
        if "position_ids" in kw:
            kw["position_ids"] = seg.ids
        if kw.get("cache_position") is not None:  # releases that still pass it
            kw["cache_position"] = torch.arange(seg.length, device=hidden.device)
        kind = self._mask_kind(layer)
        if kind not in seg.masks:
            seg.masks[kind] = self._mask(layer, hidden, seg.valid, cache_in(kwargs))
        kw["attention_mask"] = seg.masks[kind]
        return args, kw

    def _mask_kind(self, layer: int) -> str:
        types = getattr(self.config, "layer_types", None)
        return types[layer] if types else "full_attention"

    def _mask(self, layer: int, hidden: Tensor, mask2d: Tensor, cache: Any) -> Any:
        """The mask the model would build for ``layer`` over a sequence with 2-D mask ``mask2d`` (its
        own function, sized by that layer's cache)."""
        from transformers import masking_utils

        fn = masking_utils.create_sliding_window_causal_mask if self._mask_kind(layer) == "sliding_attention" \
            else masking_utils.create_causal_mask
        kw = {"config": self.config, "inputs_embeds": hidden, "attention_mask": mask2d.long(), "position_ids": None,
              "layer_idx": layer}
        kw["cache" if "cache" in _params(fn) else "past_key_values"] = cache
        return fn(**kw)

    def _run_ops(self, layer: int, hidden: Tensor) -> Tensor:
        run = self.run
        seg = run.current
        rec = self.recorders.get(layer)
        q, k, scale = rec.take() if rec is not None else (None, None, None)
        added = False
        out_hidden = hidden
        for op in self.schedule[layer]:
            P = seg.prompt
            if op.needs_attention and q is None:
                why = "tokens added by an earlier operator at this layer have none" if added else "none was captured"
                raise InputError(f"operator {op.name!r} after decoder layer {layer} reads attention, but {why}; "
                                 "put operators that add tokens last at a layer")
            ctx = LayerContext.from_qk(
                q[:, :, :P] if op.needs_attention else None, k[:, :, :P] if op.needs_attention else None,
                layer=layer, num_layers=self.num_layers, hidden=out_hidden[:, :P], visual=seg.visual[:, :P],
                valid=seg.valid[:, :P], index=seg.index[:, :P], last=seg.last(), visual_in=run.visual_in,
                scale=scale, embeds=seg.embeds[:, :P] if op.needs_embeds else None, state=run.states[id(op)])
            res = op(ctx)
            update = res if isinstance(res, LayerUpdate) else None
            keep = res.keep if update is not None else res
            adds = update is not None and update.add is not None and bool((update.added > 0).any())
            if bool(keep.all()) and not adds:
                continue
            seg, out_hidden, local = self._apply(seg, out_hidden, keep, update if adds else None,
                                                   self.position_policy[id(op)])
            if q is not None:
                if adds:
                    q = k = None
                else:
                    q = _take(q.transpose(1, 2), local.clamp_min(0)).transpose(1, 2)
                    k = _take(k.transpose(1, 2), local.clamp_min(0)).transpose(1, 2)
            added = added or adds
            run.segments.append(seg)
        index, visual = seg.index.cpu(), seg.visual.cpu()  # one copy, not one per row
        run.kept[layer] = [index[b][visual[b]] for b in range(index.shape[0])]
        return out_hidden

    def _apply(self, seg: _Segment, hidden: Tensor, keep: Tensor, update: LayerUpdate | None,
               policy: str) -> tuple[_Segment, Tensor, Tensor]:
        """Remove what ``keep`` drops from the prompt part of ``seg`` (and insert ``update``'s tokens);
        returns the new segment, hidden states and, per new prompt slot, the old slot (-1: new/padding)."""
        B, L = seg.valid.shape
        P, dev = seg.prompt, hidden.device
        E = update.add.shape[1] if update is not None else 0
        pos = torch.arange(P, device=dev).expand(B, P)
        alive = keep & seg.valid[:, :P]
        key = pos * (E + 1)
        if update is not None:
            add_valid = update.add_valid if update.add_valid is not None else torch.ones(B, E, dtype=torch.bool,
                                                                                          device=dev)
            after = update.add_after.to(dev).long()
            alive = torch.cat([alive, add_valid], 1)
            key = torch.cat([key, after.unsqueeze(1) * (E + 1) + 1 + torch.arange(E, device=dev)], 1)
        left = P == 0 or bool(seg.valid[:, P - 1].all())
        item = _repack(alive, key, left)  # [B, P'] item numbers: < P old slots, >= P added tokens
        ok = item >= 0
        slot = torch.where(ok & (item < P), item, torch.full_like(item, -1))  # old prompt slot or -1
        at = item.clamp_min(0)

        def pick(old: Tensor, new: Tensor | None, fill: Any = 0) -> Tensor:
            both = old[:, :P] if new is None else torch.cat([old[:, :P], new], 1)
            out = _take(both, at)
            mask = ok.view(*ok.shape, *([1] * (out.dim() - 2)))
            out = torch.where(mask, out, torch.full_like(out, fill) if not isinstance(fill, Tensor) else fill)
            return torch.cat([out, old[:, P:]], 1)

        anchor = None
        if update is not None:  # added tokens take the rotary (and ids) of the token they follow
            v = seg.valid[:, :P]
            first = torch.where(v, pos, torch.full_like(pos, P)).min(1).values.clamp_max(max(P - 1, 0))
            anchor = torch.where(after >= 0, after, first).clamp(0, max(P - 1, 0)).unsqueeze(1).expand(B, E)
        add_hidden = update.add.to(hidden.dtype) if update is not None else None
        new_hidden = pick(hidden, add_hidden)
        valid = torch.cat([ok, seg.valid[:, P:]], 1)
        visual = pick(seg.visual, torch.ones(B, E, dtype=torch.bool, device=dev) if update is not None else None,
                      False) & valid
        add_index = None
        if update is not None:
            add_index = update.add_index.to(dev).long() if update.add_index is not None else torch.full(
                (B, E), -1, dtype=torch.long, device=dev)
        index = torch.where(visual, pick(seg.index, add_index, -1), torch.full_like(visual, -1, dtype=torch.long))
        src0 = pick(seg.src0, torch.full((B, E), -1, dtype=torch.long, device=dev) if update is not None else None, -1)
        src0 = torch.where(valid, src0, torch.full_like(src0, -1))
        embeds = None
        if seg.embeds is not None:
            embeds = pick(seg.embeds, seg.embeds.new_zeros(B, E, seg.embeds.shape[-1]) if update is not None else None)
        ids = seg.ids
        if ids is not None:
            ids = pick(ids, _take(ids, anchor) if anchor is not None else None)
        cos = pick(seg.cos, _take(seg.cos, anchor) if anchor is not None else None)
        sin = pick(seg.sin, _take(seg.sin, anchor) if anchor is not None else None)
        shift = seg.shift
        if policy == "contiguous":
            if seg.ids is None:
                raise UnsupportedModelError(f"{type(self.adapter.model).__name__}'s decoder layers get no position_ids "
                                            "to renumber; use position_ids='original'")
            ids, shift = self._renumber(seg, ids, valid)
            cos, sin = self.adapter.position_embeddings(new_hidden, ids)
        P_new = item.shape[1]
        out = _Segment(src0=src0, valid=valid, visual=visual, index=index, prompt=P_new, cos=cos, sin=sin, ids=ids,
                       shift=shift, embeds=embeds)
        return out, new_hidden, slot

    @staticmethod
    def _renumber(seg: _Segment, ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Contiguous ids: each row's valid tokens count up from its first token's id; the shift of the
        tokens after the prompt grows by how far the last one moved back."""
        B, L = valid.shape
        pos = torch.arange(L, device=valid.device).expand(B, L)
        first = torch.where(valid, pos, torch.full_like(pos, L)).min(1).values.clamp_max(L - 1)
        last = torch.where(valid, pos, torch.full_like(pos, -1)).max(1).values.clamp_min(0)
        base = ids.gather(1, first.unsqueeze(1))
        new = torch.where(valid, base + torch.cumsum(valid.long(), 1) - 1, torch.zeros_like(ids))
        moved = ids.gather(1, last.unsqueeze(1)) - new.gather(1, last.unsqueeze(1))
        return new, seg.shift + moved.squeeze(1)

    # ------------------------------------------------------------------ decoding
    def _decode_kwargs(self, layer: int, args: tuple, kwargs: dict) -> Any:
        dec = self.decoding
        lay = dec.layout
        s = lay.segment[layer]
        if s == 0:
            return None
        hidden = self._hidden_arg(args, kwargs)
        B, q = hidden.shape[:2]
        cache = cache_in(kwargs)
        P = lay.valid[s].shape[1]
        new = cache.get_seq_length(layer) - P if cache is not None else 0  # tokens decoded since the prefill
        if dec.mask is not None:
            tail = dec.mask[:, lay.prompt0:].to(hidden.device)
        else:
            tail = torch.ones(B, new + q, dtype=torch.long, device=hidden.device)
        kw = dict(kwargs)
        kind = (s, self._mask_kind(layer))
        if kind not in dec.made:  # the layers of one segment hold equal cache lengths
            mask2d = torch.cat([lay.valid[s].to(hidden.device, tail.dtype), tail], 1)
            dec.made[kind] = self._mask(layer, hidden, mask2d, cache)
        kw["attention_mask"] = dec.made[kind]
        if lay.shifted[s]:
            shift = lay.shift[s]
            if s not in dec.made:
                ids = kwargs.get("position_ids")
                if ids is None:
                    ids = (torch.arange(q, device=hidden.device) + lay.prompt0 + new).unsqueeze(0)  # the model's default
                ids = ids.expand(B, q) - shift.to(ids.device).unsqueeze(1)
                dec.made[s] = ids, self.adapter.position_embeddings(hidden, ids)
            ids, kw["position_embeddings"] = dec.made[s]
            if "position_ids" in kw:
                kw["position_ids"] = ids
        return args, kw


def _params(fn: Any) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)
