"""LLaVA-NeXT: transformers' ``LlavaNextForConditionalGeneration`` (AnyRes).

An image is a base view plus the ``nH x nW`` crops its ``image_sizes`` select from
``image_grid_pinpoints``; the tower runs once per partition (``pixel_values`` is ``[images,
max partitions, 3, H, W]``, padded). One image's tokens are its partitions' patch tokens
concatenated (``index = p*h*w + raster``, ``group = p``, ``Layout.for_anyres``;
:func:`vtc.integrations.anyres.group_partitions`); the crop tokens that the unpad removes are
dropped before the first operator unless it asks to see them (``padding=`` option). After the
operators the kept tokens are assembled into LLaVA-NeXT's sequence (base, unpadded crop grid,
``image_newline`` per row; :func:`vtc.integrations.anyres.assemble`), before the first llm-stage
operator that works on the assembled sequence or at the end (``llm_view=``). The unpad and the crop
layout follow the crop rules the pipeline's operators declare (``unpad_rounding=``; see
:mod:`vtc.integrations.options`). An operator that keeps the tower's CLS token (VisionZip official)
gets each partition's as the partition's first token (:mod:`vtc.integrations.cls_token`); the
assembly puts the crops' CLS tokens after the crop grid. Geometry: :mod:`vtc.geometry`; options:
:mod:`vtc.integrations.options`.
"""

from __future__ import annotations

from typing import Any

import torch

from vtc.errors import InputError, UnsupportedModelError
from vtc.geometry import Layout, cached_table, stock_length, unpadded_positions
from vtc.integrations import anyres, cls_token
from vtc.integrations.adapters import register_adapter
from vtc.integrations.adapters.base import Encoded
from vtc.integrations.adapters.llava import LlavaAdapter
from vtc.integrations.signals import tokens_from
from vtc.tokens import VisualTokens, inputs_checked

__all__ = ["LlavaNextAdapter"]


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    class_names = ("LlavaNextForConditionalGeneration",)
    model_types = ("llava_next",)

    def bind(self, pipeline: Any, options: Any, handle: Any) -> None:
        super().bind(pipeline, options, handle)
        self.newline_policy = options.newline_policy(pipeline)
        self.assemble_at = options.assembly_point(pipeline)
        self.drop_padding = options.drops_padding(pipeline, self.assemble_at)
        self.rules = options.crop_rules(pipeline)

    def layouts(self, image_sizes: Any) -> tuple[list[tuple[int, int]], list[int], list[Layout]]:
        """``(sizes, partitions per image, layouts)`` of a batch's ``image_sizes`` (the processor's)."""
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        if image_sizes is None:
            raise InputError("LLaVA-NeXT needs image_sizes (the processor returns them) to lay out its crops")
        cfg = self.config
        sizes = [tuple(int(v) for v in s) for s in torch.as_tensor(image_sizes).tolist()]
        size_px = cfg.vision_config.image_size
        parts = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, size_px) for s in sizes]
        layouts = [Layout.for_anyres(self.grid, get_anyres_image_grid_shape(s, cfg.image_grid_pinpoints, size_px), s)
                   for s in sizes]
        return sizes, parts, layouts

    def encode(self, kw: dict[str, Any]) -> Encoded:
        h, w = self.grid
        sizes, parts, layouts = self.layouts(kw.get("image_sizes"))
        pixel_values = anyres.partition_pixels(kw["pixel_values"], parts, "LLaVA-NeXT")
        feats, cls = self.features(pixel_values, kw)
        if feats.shape[1] != h * w:
            raise UnsupportedModelError(
                f"LLaVA-NeXT crops give {feats.shape[1]} feature tokens, not the {h}x{w} patch grid; vtc needs "
                "vision_feature_select_strategy='default' on a CLS tower (or 'full' on a tower without CLS)")
        flat = tokens_from(feats, self.tap, self.requires)
        projected = not self.has_vision_ops
        if projected:  # project exactly as stock does, partition by partition
            flat = flat.replace(x=self.projector(flat.x))
            cls = None if cls is None else self.projector(cls)
        tokens = anyres.group_partitions(flat, parts, layouts)
        if self.drop_padding:  # what the unpad removes, by a table cached per batch of layouts
            pos, valid, some = unpadded_positions(layouts, self.rules, tokens.device)
            with inputs_checked():
                tokens = tokens.gather(pos, valid, some_invalid=some)
        if cls is not None:  # [partition rows, D] -> [images, partitions, D]
            rows = cached_table(("partition-rows", tuple(parts)), cls.device, lambda: [
                [min(sum(parts[:i]) + p, len(cls) - 1) for p in range(max(parts))] for i in range(len(parts))])
            tokens = cls_token.insert(tokens, cls[rows], parts)
        newline = self.inner.image_newline

        exact = self.assemble_at < len(self.pipeline)  # operators follow: no padding unless needed

        def assemble(t: VisualTokens) -> VisualTokens:
            return anyres.assemble(t, newline, self.newline_policy, self.options.unpad, self.rules, exact,
                                   cls=self.cls_token)

        out = self.run_pipeline(tokens, self.projector, projected=projected, out_dim=self.text_width,
                                assemble=assemble, assemble_at=self.assemble_at)
        return Encoded(out, [stock_length(lay) for lay in layouts])

    def tower_grids(self, inputs: dict[str, Any]) -> list[list[tuple[int, int]]]:
        """One pass per partition (base + crops) of each image; images are taken in prompt order."""
        sizes = inputs.get("image_sizes")
        if sizes is None:
            return super().tower_grids(inputs)
        _, parts, _ = self.layouts(sizes)
        out, i = [], 0
        for n in self.images_per_prompt(inputs):
            out.append([self.grid] * sum(parts[i:i + n]))
            i += n
        return out
