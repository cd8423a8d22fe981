"""Hugging Face ``LlavaForConditionalGeneration`` and ``LlavaNextForConditionalGeneration``, stock.

How it hooks: the model instance gets its own ``forward`` (a wrapper around the bound original,
signature preserved), nothing else. On a call that brings ``pixel_values`` (a plain forward or
``generate()``'s prefill), the wrapper runs the vision tower itself (with a ``vtc.taps`` tap when
the pipeline needs signals), takes the feature-layer patch tokens (``vision_feature_layer``,
``vision_feature_select_strategy``), runs the pipeline's stages around the model's own projector
(:mod:`vtc.integrations.stages`), assembles LLaVA-NeXT's AnyRes sequence
(:mod:`vtc.integrations.anyres`), compacts the prompt (:mod:`vtc.integrations.compaction`),
builds ``inputs_embeds`` from the model's embedding table and calls the original forward with
them; the language model, its masks, cache and loss are stock. Decoding calls that continue a
compacted KV cache (``generate()``'s later steps, or a user's loop) get their attention mask mapped
onto the cache and their position ids shifted (``"contiguous"``) or kept (``"original"``), so
``generate()`` returns what stock returns: the original prompt ids followed by the new tokens.
A forward's logits are over the compacted sequence; ``handle.last.positions`` maps them back.
The wrapper's signature hides ``mm_encoder_outputs``, so ``generate()`` does not pre-encode
images with the stock ``get_image_features`` but hands ``pixel_values`` to the wrapped forward;
pre-encoded image features reaching the wrapper raise an error instead of going uncompressed.
Releases that still pass ``cache_position`` get it renumbered over the compacted cache; the cache
comes as ``cache`` or ``past_key_values`` by release (:mod:`vtc.integrations.kv_cache`). Tested
with transformers 5.0.0, 5.12.1, 5.23.0 and 5.24.0.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any

import torch
from torch import Tensor

from vtc.errors import InputError, UnsupportedModelError
from vtc.integrations import anyres, compaction
from vtc.integrations.handle import Compressed, Handle
from vtc.integrations.kv_cache import cache_in, cache_length, cache_out
from vtc.integrations.options import ApplyOptions
from vtc.integrations.signals import open_tap, tokens_from
from vtc.integrations.stages import replaces_projector, run_stages
from vtc.integrations.towers import feature_tokens
from vtc.pipeline import Pipeline
from vtc.tokens import Layout, VisualTokens

__all__ = ["SUPPORTED", "supports", "attach"]

SUPPORTED = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
_MARK = "__vtc_handle__"


def _classes() -> dict[str, type]:
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    return {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}


def kind_of(model: Any) -> str | None:
    """``"llava"``, ``"llava_next"`` or None. Subclasses (LLaVA-NeXT first) count as their base."""
    if not any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
        return None
    classes = _classes()
    if isinstance(model, classes["llava_next"]):
        return "llava_next"
    if isinstance(model, classes["llava"]):
        return "llava"
    return None


def supports(model: Any) -> bool:
    return kind_of(model) is not None


def _set_image_features(out: Any, feats: Tensor) -> None:
    """Report the compressed visual features the language model received, where stock reports its
    image features: ``image_hidden_states`` (transformers < 5.24) or ``image_outputs.pooler_output``
    (5.24 on, where reading ``image_hidden_states`` is deprecated)."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    if "image_hidden_states" in fields:
        out.image_hidden_states = feats
    elif "image_outputs" in fields:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out.image_outputs = BaseModelOutputWithPooling(pooler_output=feats)


class _LlavaCompressor:
    """The per-instance state behind the wrapped forward."""

    def __init__(self, model: Any, pipeline: Pipeline, options: ApplyOptions, handle: Handle) -> None:
        self.model = model
        self.kind = kind_of(model)
        self.pipeline = pipeline
        self.options = options
        self.handle = handle
        self.inner = model.model
        self.tower = self.inner.vision_tower
        self.projector = self.inner.multi_modal_projector
        cfg = model.config
        token_id = getattr(cfg, "image_token_id", None)
        self.image_token_id = int(cfg.image_token_index if token_id is None else token_id)
        self.pad_id = getattr(cfg.text_config, "pad_token_id", None)
        if self.pad_id is None:
            self.pad_id = 0
        vc = cfg.vision_config
        self.grid = (vc.image_size // vc.patch_size, vc.image_size // vc.patch_size)
        self.text_width = cfg.text_config.hidden_size
        self.has_vision_ops = any(op.stage == "vision" for op in pipeline)
        replaces_projector(pipeline)  # a misplaced projector-replacing operator fails here, not at the first call
        self.requires = pipeline.requires
        self.tap = open_tap(self.tower, self.requires, who=f"the pipeline {pipeline}")
        if self.tap is not None:
            handle.on_remove(self.tap.remove)
        if self.kind == "llava_next":
            self.newline_policy = options.newline_policy(pipeline)
            self.assemble_at = options.assembly_point(pipeline)
            self.drop_padding = options.drops_padding(pipeline, self.assemble_at)
        self.states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ vision side
    def _features(self, pixel_values: Tensor, layer: Any, strategy: str) -> tuple[Tensor, Any]:
        """Feature-layer patch tokens; the tap (attached until remove()) records this forward's signals."""
        drop = 1 if strategy == "default" else 0
        return feature_tokens(self.tower, pixel_values, layer, drop), self.tap

    def encode(self, pixel_values: Tensor, image_sizes: Any, layer: Any, strategy: str) -> tuple[VisualTokens, list[int]]:
        """Compressed LLM-width tokens per image and the stock token count of each image."""
        h, w = self.grid
        if self.kind == "llava":
            if pixel_values.dim() != 4:
                raise InputError(f"LLaVA pixel_values must be [images, 3, H, W], got {tuple(pixel_values.shape)}")
            feats, tap = self._features(pixel_values, layer, strategy)
            n = feats.shape[1]
            layout = Layout.grid(h, w) if n == h * w else None
            tokens = tokens_from(feats, tap, self.requires, layout)
            out = run_stages(self.pipeline, tokens, self.projector, out_dim=self.text_width)
            return out, [n] * feats.shape[0]
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        if image_sizes is None:
            raise InputError("LLaVA-NeXT needs image_sizes (the processor returns them) to lay out its crops")
        cfg = self.model.config
        sizes = [tuple(int(v) for v in s) for s in torch.as_tensor(image_sizes).tolist()]
        size_px = cfg.vision_config.image_size
        parts = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, size_px) for s in sizes]
        if pixel_values.dim() == 5:
            keep = torch.arange(pixel_values.shape[1], device=pixel_values.device).unsqueeze(0) < torch.tensor(
                parts, device=pixel_values.device).unsqueeze(1)
            pixel_values = pixel_values[keep]
        elif pixel_values.dim() != 4:
            raise InputError(f"LLaVA-NeXT pixel_values must be 4- or 5-dimensional, got {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] != sum(parts):
            raise InputError(
                f"pixel_values hold {pixel_values.shape[0]} crops but image_sizes {sizes} need {sum(parts)}")
        layouts = [anyres.anyres_layout((h, w), get_anyres_image_grid_shape(s, cfg.image_grid_pinpoints, size_px), s)
                   for s in sizes]
        feats, tap = self._features(pixel_values, layer, strategy)
        if feats.shape[1] != h * w:
            raise UnsupportedModelError(
                f"LLaVA-NeXT crops give {feats.shape[1]} feature tokens, not the {h}x{w} patch grid; vtc needs "
                "vision_feature_select_strategy='default' on a CLS tower (or 'full' on a tower without CLS)")
        flat = tokens_from(feats, tap, self.requires)
        projected = not self.has_vision_ops
        if projected:  # project exactly as stock does, partition by partition
            flat = flat.replace(x=self.projector(flat.x))
        tokens = anyres.group_partitions(flat, parts, layouts)
        if self.drop_padding:
            tokens = anyres.drop_padding(tokens)
        newline = self.inner.image_newline

        def assemble(t: VisualTokens) -> VisualTokens:
            return anyres.assemble(t, newline, self.newline_policy, self.options.unpad)

        out = run_stages(self.pipeline, tokens, self.projector, projected=projected, out_dim=self.text_width,
                         assemble=assemble, assemble_at=self.assemble_at)
        return out, [anyres.stock_length(lay) for lay in layouts]

    # ------------------------------------------------------------------ the wrapped forward
    def prefill(self, original: Any, kw: dict[str, Any]) -> Any:
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
        cfg = self.model.config
        layer = kw.get("vision_feature_layer")
        layer = cfg.vision_feature_layer if layer is None else layer
        strategy = kw.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        tokens, stock = self.encode(kw["pixel_values"], kw.get("image_sizes"), layer, strategy)
        counts = tokens.counts
        plan = compaction.plan(input_ids, mask, self.image_token_id, stock, counts)
        ids = plan.ids(input_ids, self.pad_id) if plan.changed else input_ids
        embeds = self.model.get_input_embeddings()(ids)
        feats = tokens.x[tokens.valid].to(embeds.device, embeds.dtype)
        slots = (ids == self.image_token_id).unsqueeze(-1).to(embeds.device)
        embeds = embeds.masked_scatter(slots, feats)
        call = dict(kw)
        call.update(input_ids=None, inputs_embeds=embeds, pixel_values=None)
        if "image_sizes" in call:
            call["image_sizes"] = None
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)
        if plan.changed:
            call["attention_mask"] = plan.attention_mask(mask)
            if call["attention_mask"] is None and self.options.position_ids == "original":
                # without a mask and a cache, HF reads position gaps as packed sequences
                call["attention_mask"] = plan.slot_valid.long()
            call["position_ids"] = plan.position_ids(kw.get("position_ids"), self.options.position_ids)
            call["labels"] = plan.labels(kw.get("labels"))
            positions = torch.where(plan.slot_valid, plan.src, torch.full_like(plan.src, -1))
            if kw.get("cache_position") is not None:  # transformers releases that still pass it
                call["cache_position"] = torch.arange(plan.length, device=kw["cache_position"].device)
        out = original(**call)
        if plan.changed:
            new_cache = cache_out(out)
            if new_cache is not None:
                self.states[new_cache] = compaction.DecodeState(
                    prompt_length=input_ids.shape[1], compact_length=plan.length,
                    prompt_mask=call["attention_mask"], dropped=plan.dropped, mode=self.options.position_ids)
        _set_image_features(out, feats)
        self.handle.last = Compressed(
            counts=counts.tolist(), stock_counts=list(stock), index=tokens.unbind_index(),
            num_patches=[lay.num_tokens if lay is not None else int(tokens.num_tokens) for lay in tokens.layouts()],
            positions=positions, tokens=tokens.replace(x=tokens.x.detach()),
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
        call["position_ids"] = state.position_ids(kw.get("position_ids"), cache_len, q, x.device)
        if kw.get("cache_position") is not None:
            call["cache_position"] = torch.arange(cache_len, cache_len + q, device=kw["cache_position"].device)
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
                "pass pixel_values (and image_sizes) so vtc.apply can compress the visual tokens")
        return self.decode(original, kw)


def attach(model: Any, pipeline: Pipeline, options: ApplyOptions) -> Handle:
    """Wrap ``model.forward`` (this instance only); see the module docstring."""
    if kind_of(model) is None:
        raise UnsupportedModelError(
            f"vtc.apply supports transformers' {' and '.join(SUPPORTED)}, not {type(model).__name__}. For your own "
            "LLaVA-style code use vtc.integrations.VisualCompressor(tower, projector, pipeline)")
    existing = model.__dict__.get("forward")
    if existing is not None and getattr(existing, _MARK, None) is not None:
        raise InputError("vtc.apply is already active on this model; remove() its handle (or leave its `with` block) first")
    handle = Handle(model, pipeline, options)
    try:
        if any(True for _ in pipeline.parameters()):
            pipeline.to(model.device)
        comp = _LlavaCompressor(model, pipeline, options, handle)
        original = model.forward  # bound method (or a user's instance attribute)
        signature = inspect.signature(original)

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return comp(original, signature, args, kwargs)

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
