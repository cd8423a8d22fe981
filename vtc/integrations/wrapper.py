"""The per-instance forward wrapper that ``vtc.apply`` puts on a model, for every adapter.

How it hooks: the model instance gets its own ``forward`` (a wrapper around the bound original,
signature preserved), nothing else. On a call that brings ``pixel_values`` (a plain forward or
``generate()``'s prefill), the wrapper has the model's adapter encode and compress the images
(:meth:`~vtc.integrations.adapters.ModelAdapter.encode`), compacts the prompt
(:mod:`vtc.integrations.compaction`), and calls the original forward with the adapter's inputs for
the compacted prompt (``inputs_embeds``, or the model's precomputed-features seam) and its
position ids; the language model, its masks, cache and loss are stock. Decoding calls that
continue a compacted KV cache (``generate()``'s later steps, or a user's loop) get their attention
mask mapped onto the cache and their position ids from the adapter, so ``generate()`` returns what
stock returns: the original prompt ids followed by the new tokens. A forward's logits are over the
compacted sequence; ``handle.last.positions`` maps them back. A pipeline with ``llm_layer``
operators also gets a :class:`~vtc.integrations.llm_layer.LayerStage` (hooks inside the decoder),
told of every prefill (with how many leading columns are the prompt) and decoding step. The wrapper's signature hides
``mm_encoder_outputs``, so ``generate()`` does not pre-encode images with the stock
``get_image_features`` but hands ``pixel_values`` to the wrapped forward; pre-encoded image
features reaching the wrapper raise an error instead of going uncompressed. Releases that still
pass ``cache_position`` get it renumbered over the compacted cache; the cache comes as ``cache`` or
``past_key_values`` by release (:mod:`vtc.integrations.kv_cache`). Tested with transformers 5.0.0,
5.12.1, 5.23.0 and 5.24.0.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any

import torch
from torch import Tensor

from vtc.errors import InputError
from vtc.integrations import compaction
from vtc.integrations.adapters.base import ModelAdapter
from vtc.integrations.handle import Compressed, Handle
from vtc.integrations.kv_cache import cache_in, cache_length, cache_out
from vtc.integrations.llm_layer import LayerStage
from vtc.integrations.options import ApplyOptions
from vtc.pipeline import Pipeline

__all__ = ["attach"]

_MARK = "__vtc_handle__"


class _Wrapped:
    """The per-instance state behind the wrapped forward."""

    def __init__(self, adapter: ModelAdapter, handle: Handle, stage: LayerStage | None = None) -> None:
        self.adapter = adapter
        self.handle = handle
        self.stage = stage
        self.states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.prompt: tuple[Any, Tensor] | None = None  # the last prompt's (pixel_values ref, input_ids)

    def prompt_columns(self, kw: dict[str, Any], input_ids: Tensor) -> int:
        """How many leading columns of ``input_ids`` are the prompt: fewer than all when this call
        repeats the last prompt's ``pixel_values`` tensor and extends its ``input_ids`` (a step of
        ``generate(use_cache=False)``), so in-LLM operators decide on the prompt alone."""
        pv = kw.get("pixel_values")
        if self.prompt is not None:
            ref, ids = self.prompt
            n = ids.shape[1]
            if (ref() is pv and input_ids.shape[0] == ids.shape[0] and input_ids.shape[1] > n
                    and torch.equal(input_ids[:, :n], ids)):
                return n
        self.prompt = (weakref.ref(pv), input_ids.clone())
        return input_ids.shape[1]

    def prefill(self, original: Any, kw: dict[str, Any]) -> Any:
        ad = self.adapter
        input_ids = kw.get("input_ids")
        if input_ids is None:
            raise InputError("with vtc.apply, pass input_ids (not inputs_embeds) together with pixel_values")
        if kw.get("mm_encoder_outputs") is not None:
            raise InputError("pass pixel_values or mm_encoder_outputs, not both")
        if cache_length(cache_in(kw)) > 0:
            raise InputError(
                "vtc compresses images when the prompt is first encoded; this call brings pixel_values to a KV cache "
                "that already holds tokens. Start from an empty cache (or none)")
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise InputError(f"vtc.apply needs a 2-D attention_mask [batch, length], got {tuple(mask.shape)}")
        stage = self.stage
        generated = input_ids.shape[1] - self.prompt_columns(kw, input_ids) if stage is not None else 0
        encoded = ad.encode(kw)
        tokens = encoded.tokens
        counts = tokens.counts if tokens.mask is not None else [tokens.num_tokens] * tokens.batch_size
        plan = compaction.plan(input_ids, mask, ad.image_token_id, encoded.stock, counts)
        encoded.kept = plan.kept  # host counts from the plan's one sync
        ids = plan.ids(input_ids, ad.pad_token_id) if plan.changed else input_ids
        call = dict(kw)
        call.update(ad.language_inputs(kw, ids, encoded))
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)
        if plan.changed:
            call["attention_mask"] = plan.attention_mask(mask)
            if call["attention_mask"] is None and ad.mode == "original":
                # without a mask and a cache, HF reads position gaps as packed sequences
                call["attention_mask"] = plan.slot_valid.long()
            call["labels"] = plan.labels(kw.get("labels"))
            positions = torch.where(plan.slot_valid, plan.src, torch.full_like(plan.src, -1))
            if kw.get("cache_position") is not None:  # transformers releases that still pass it
                call["cache_position"] = torch.arange(plan.length, device=kw["cache_position"].device)
        position_ids = ad.prefill_positions(kw, plan, encoded)
        if position_ids is not None:
            call["position_ids"] = position_ids
        if stage is None:
            out = original(**call)
        else:
            with stage.prefill(ids, call.get("attention_mask"), ids.shape[1] - generated, cache_in(call)):
                out = original(**call)
        if plan.changed or ad.tracks_every_prefill or stage is not None:
            new_cache = cache_out(out)
            if new_cache is not None:
                self.states[new_cache] = ad.decode_state(kw, plan, call, encoded)
                if stage is not None:
                    stage.remember(new_cache)
        ad.report_features(out, encoded)
        self.handle.last = Compressed(
            counts=list(plan.kept), stock_counts=list(encoded.stock),
            index=[tokens.index[i, :k] for i, k in enumerate(plan.kept)],
            num_patches=[lay.num_tokens if lay is not None else int(tokens.num_tokens) for lay in tokens.layouts()],
            positions=positions, tokens=tokens.replace(x=tokens.x.detach()),
            extra=stage.report() if stage is not None else {},
        )
        return out

    def decode(self, original: Any, kw: dict[str, Any]) -> Any:
        cache = cache_in(kw)
        state = self.states.get(cache) if cache is not None else None
        if state is None:
            return original(**kw)
        x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        q = x.shape[1]
        cache_len = cache_length(cache)
        call = dict(kw)
        call["attention_mask"] = state.attention_mask(kw.get("attention_mask"), cache_len, q)
        call["position_ids"] = self.adapter.decode_positions(state, kw.get("position_ids"), cache_len, q, x.device)
        if kw.get("cache_position") is not None:
            call["cache_position"] = torch.arange(cache_len, cache_len + q, device=kw["cache_position"].device)
        if self.stage is not None:
            with self.stage.decode(cache, call["attention_mask"]):
                return original(**call)
        return original(**call)

    def __call__(self, original: Any, signature: inspect.Signature, args: tuple, kwargs: dict) -> Any:
        self.handle.check_active()
        bound = signature.bind(*args, **kwargs)
        kw: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                kw.update(value)
            else:
                kw[name] = value
        pv = kw.get("pixel_values")
        if pv is not None and pv.numel() > 0:
            return self.prefill(original, kw)
        pre = kw.get("mm_encoder_outputs")
        if pre and pre.get("image") is not None:
            raise InputError(
                "this call brings pre-encoded image features (mm_encoder_outputs), which vtc cannot compress; "
                "pass pixel_values (and the image sizes or grids the processor returns) so vtc.apply can compress "
                "the visual tokens")
        return self.decode(original, kw)


def attach(model: Any, adapter: ModelAdapter, pipeline: Pipeline, options: ApplyOptions) -> Handle:
    """Wrap ``model.forward`` (this instance only) to run ``pipeline`` through ``adapter``; see the module docstring."""
    existing = model.__dict__.get("forward")
    if existing is not None and getattr(existing, _MARK, None) is not None:
        raise InputError("vtc.apply is already active on this model; remove() its handle (or leave its `with` block) first")
    handle = Handle(model, pipeline, options)
    try:
        if any(True for _ in pipeline.parameters()):
            pipeline.to(model.device)
        adapter.bind(pipeline, options, handle)
        stage = LayerStage(adapter, pipeline, handle) if pipeline.has_stage("llm_layer") else None
        wrapped = _Wrapped(adapter, handle, stage)
        original = model.forward  # bound method (or a user's instance attribute)
        signature = inspect.signature(original)

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return wrapped(original, signature, args, kwargs)

        # generate() pre-encodes images through get_image_features when forward advertises
        # `mm_encoder_outputs` (transformers >= 5.x); hiding it makes generate() pass pixel_values
        # to this forward at prefill, as it does for models without pre-encoding
        forward.__signature__ = signature.replace(
            parameters=[p for p in signature.parameters.values() if p.name != "mm_encoder_outputs"])
        setattr(forward, _MARK, handle)
        handle.set_attr(model, "forward", forward)
    except BaseException:
        handle.remove()
        raise
    return handle
