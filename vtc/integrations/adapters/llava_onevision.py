"""LLaVA-OneVision: transformers' ``LlavaOnevisionForConditionalGeneration`` (AnyRes, SigLIP, no CLS).

An image is a base view plus the ``nH x nW`` crops its ``image_sizes`` select from
``image_grid_pinpoints``, as in LLaVA-NeXT, but the crops reach the language model as one packed
grid: the model's own ``pack_image_features`` places the crops' tokens on the ``(nH*h) x (nW*w)``
grid, cuts it to the unpadded rectangle and, when that grid holds more than ``1.1² x
max_num_patches`` base grids (``vision_aspect_ratio="anyres_max_9"``), bilinearly downsamples it
by ``sqrt(H*W / (max_num_patches*h*w))``; a newline token follows every row. Packed tokens stop
being patches, so vtc lays an image out as two partitions (``Layout(grids=((h, w), (gh, gw)))``):
the base view (``group`` 0, ``h*w`` patches) and the packed grid (``group`` 1, ``gh*gw`` tokens,
``index = h*w + raster``). The tower's signals are packed the same way (as 1-channel or ``d``-channel
maps), so every operator sees tokens and signals of the packed grid. Prompts with several images
(``batch_num_images > 1``) use each image's base view only, followed by one newline token.

Order of operations: with no vision-stage operator the features are projected first and packed
after, exactly as stock (bit-identical when nothing is dropped). With a vision-stage operator the
packing (the unpad and, where it applies, the bilinear downsample) runs on the tower's features and
the projector after the operators: the same tokens, but a downsampled grid is then projected after
the interpolation rather than before (the projector is not linear), so its values differ slightly
from stock's.

After the operators the kept tokens are assembled into OneVision's sequence: the base tokens in the
order the operators left them, then the packed-grid tokens in raster order with a newline after each
row (``newline=``: ``"rows"`` after each row that still holds a token, the default and stock when
nothing is dropped; ``"unpadded_rows"`` / ``"all_rows"`` after every row; ``"none"``); a base-only
image gets its one newline after its tokens. Videos are not compressed: a call with videos and no
images runs stock; a call with both is refused. The CLS token (VisionZip official) is not handed in
(SigLIP has none; a packed grid has no per-crop CLS).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vtc.errors import ConfigError, InputError, UnsupportedModelError
from vtc.geometry import Layout
from vtc.integrations.adapters import register_adapter
from vtc.integrations.adapters.base import Encoded
from vtc.integrations.adapters.llava import LlavaAdapter
from vtc.integrations.anyres import partition_pixels
from vtc.integrations.signals import tokens_from
from vtc.tokens import VisualTokens

__all__ = ["LlavaOnevisionAdapter"]


@register_adapter
class LlavaOnevisionAdapter(LlavaAdapter):
    family = "llava_onevision"
    class_names = ("LlavaOnevisionForConditionalGeneration",)
    model_types = ("llava_onevision",)
    image_inputs = ("image_sizes", "batch_num_images")
    hands_cls_token = False

    def bind(self, pipeline: Any, options: Any, handle: Any) -> None:
        if not options.unpad:
            raise ConfigError("LLaVA-OneVision packs its crops unpadded (its own pack_image_features); unpad=False "
                              "is not available on this family")
        super().bind(pipeline, options, handle)
        self.newline_policy = options.newline_policy(pipeline)
        self.assemble_at = options.assembly_point(pipeline)

    # ------------------------------------------------------------------ layout of a call's images
    def plan(self, kw: dict[str, Any]) -> tuple[list[Tensor], list[int]]:
        """``(image sizes, tower passes per image)``: 1 + crops for a single-image prompt, 1 (the base
        view) for each image of a prompt with several (``batch_num_images``)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        sizes = kw.get("image_sizes")
        if sizes is None:
            raise InputError("LLaVA-OneVision needs image_sizes (the processor returns them) to lay out its crops")
        sizes = list(torch.as_tensor(sizes))
        per_prompt = kw.get("batch_num_images")
        patched = ([True] * len(sizes) if per_prompt is None
                   else [int(n) == 1 for n in per_prompt for _ in range(int(n))])
        if len(patched) != len(sizes):
            raise InputError(f"batch_num_images {list(map(int, per_prompt))} describe {len(patched)} images but "
                             f"image_sizes has {len(sizes)}")
        cfg = self.config
        parts = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if p else 1
                 for s, p in zip(sizes, patched)]
        return sizes, parts

    def aspect(self, kw: dict[str, Any]) -> str:
        return kw.get("vision_aspect_ratio") or self.config.vision_aspect_ratio

    def pack(self, maps: Tensor, size: Tensor, aspect: str) -> Tensor:
        """The model's own packing of one image's ``[P, N, C]`` per-partition maps: ``[N + gh*gw, C]``."""
        out, _ = self.inner.pack_image_features([maps], [size], image_newline=None, vision_aspect_ratio=aspect)
        return out[0]

    def packed_grid(self, size: Tensor, parts: int, aspect: str) -> tuple[int, int]:
        """``(gh, gw)``: the packed crop grid of an image, read from the model's packing of a 1-channel
        map with a marker for newlines."""
        n = self.grid[0] * self.grid[1]
        probe = torch.zeros(parts, n, 1, device=self.model.device)
        out, _ = self.inner.pack_image_features([probe], [size], image_newline=torch.ones(1, device=probe.device),
                                                vision_aspect_ratio=aspect)
        rows = int(out[0][n:].sum().item())
        return rows, (out[0].shape[0] - n) // rows - 1

    # ------------------------------------------------------------------ images -> tokens
    def encode(self, kw: dict[str, Any]) -> Encoded:
        if kw.get("pixel_values_videos") is not None:
            raise InputError("vtc.apply compresses LLaVA-OneVision's images, not its videos; pass images and videos "
                             "in separate calls (a call with videos only runs stock)")
        h, w = self.grid
        n = h * w
        sizes, parts = self.plan(kw)
        pixel_values = partition_pixels(kw["pixel_values"], parts, "LLaVA-OneVision")
        feats, _ = self.features(pixel_values, kw)
        if feats.shape[1] != n:
            raise UnsupportedModelError(f"LLaVA-OneVision's tower gives {feats.shape[1]} feature tokens, not the "
                                        f"{h}x{w} patch grid")
        flat = tokens_from(feats, self.tap, self.requires)
        projected = not self.has_vision_ops
        if projected:  # project exactly as stock does (all partitions at once), then pack
            flat = flat.replace(x=self.projector(flat.x))
        aspect = self.aspect(kw)
        xs, signals, layouts, stock = [], [], [], []
        start = 0
        for size, p in zip(sizes, parts):
            rows = slice(start, start + p)
            start += p
            if p == 1:
                xs.append(flat.x[rows][0])
                signals.append({k: {l: t[rows][0] for l, t in v.items()} for k, v in flat.signals.items()})
                layouts.append(Layout.grid(h, w))
                stock.append(n + 1)
                continue
            gh, gw = self.packed_grid(size, p, aspect)
            xs.append(self.pack(flat.x[rows], size, aspect))
            signals.append({k: {l: self._pack_signal(t[rows], size, aspect) for l, t in v.items()}
                            for k, v in flat.signals.items()})
            layouts.append(Layout(grids=((h, w), (gh, gw))))
            stock.append(n + gh * (gw + 1))
        tokens = VisualTokens.from_list(
            xs, index=[torch.arange(len(x), device=x.device) for x in xs],
            group=[(torch.arange(len(x), device=x.device) >= n).long() for x in xs],
            signals={k: {l: [s[k][l] for s in signals] for l in flat.signals[k]} for k in flat.signals} or None,
            layout=tuple(layouts), layer_space=flat.layer_space)
        out = self.run_pipeline(tokens, self.projector, projected=projected, out_dim=self.text_width,
                                assemble=self.assemble, assemble_at=self.assemble_at)
        return Encoded(out, stock)

    def _pack_signal(self, t: Tensor, size: Tensor, aspect: str) -> Tensor:
        """A per-partition signal ``[P, N]`` or ``[P, N, d]`` packed like the features."""
        if t.dim() == 2:
            return self.pack(t.unsqueeze(-1), size, aspect).squeeze(-1)
        return self.pack(t, size, aspect)

    # ------------------------------------------------------------------ kept tokens -> the sequence
    def assemble(self, tokens: VisualTokens) -> VisualTokens:
        """OneVision's sequence of every image's kept tokens (see the module docstring): base tokens in
        operator order, packed-grid tokens in raster order, newline tokens per :attr:`newline_policy`
        (index ``num_tokens + row``, size 1, zero signals, the grid's ``group``)."""
        newline = self.inner.image_newline
        policy = self.newline_policy
        per_image: dict[str, list] = {"x": [], "index": [], "group": [], "size": []}
        sigs: dict[str, dict[int, list[Tensor]]] = {k: {l: [] for l in v} for k, v in tokens.signals.items()}
        group_all = tokens.group if tokens.group is not None else torch.zeros_like(tokens.index)
        for b, lay in enumerate(tokens.layouts()):
            m = int(tokens.counts[b])
            x, index, group = tokens.x[b, :m], tokens.index[b, :m], group_all[b, :m]
            size = tokens.sizes[b, :m]
            n = lay.grids[0][0] * lay.grids[0][1]
            pos = torch.arange(m, device=x.device)
            if len(lay.grids) == 1:  # base view only: its tokens, then one newline
                key = pos
                nl_row = torch.zeros(1, dtype=torch.long, device=x.device)
                nl_key = torch.full((1,), m, dtype=torch.long, device=x.device)
                has_row = torch.tensor([m > 0], device=x.device)
                nl_group = 0
            else:
                rows, gw = lay.grids[1]
                local = (index - n).clamp_min(0)
                key = torch.where(group == 0, pos, m + (local // gw) * (gw + 1) + local % gw)
                nl_row = torch.arange(rows, device=x.device)
                nl_key = m + nl_row * (gw + 1) + gw
                has_row = torch.zeros(rows, dtype=torch.bool, device=x.device)
                has_row[(local // gw)[group == 1]] = True
                nl_group = 1
            wanted = {"rows": has_row, "none": torch.zeros_like(has_row)}.get(policy, torch.ones_like(has_row))
            nl_row, nl_key = nl_row[wanted], nl_key[wanted]
            order = torch.sort(torch.cat([key, nl_key])).indices
            is_tok = order < m
            tok = order.clamp_max(max(m - 1, 0))
            nl_row = torch.cat([nl_row, nl_row.new_zeros(1)])  # a spare entry for the token slots' lookups
            nl = (order - m).clamp(0, len(nl_row) - 1)
            nl_x = newline.to(x.dtype).to(x.device).expand(len(order), -1)
            per_image["x"].append(_take(x, tok, is_tok, nl_x))
            per_image["index"].append(torch.where(is_tok, index[tok] if m else nl, lay.num_tokens + nl_row[nl]))
            per_image["group"].append(torch.where(is_tok, group[tok] if m else nl, torch.full_like(nl, nl_group)))
            per_image["size"].append(_take(size, tok, is_tok, 1.0))
            for k, v in tokens.signals.items():
                for l, t in v.items():
                    sigs[k][l].append(_take(t[b, :m], tok, is_tok, 0.0))
        if not any(len(x) for x in per_image["x"]):
            return tokens
        return VisualTokens.from_list(
            per_image["x"], index=per_image["index"], group=per_image["group"],
            size=per_image["size"] if tokens.size is not None else None, signals=sigs or None,
            layout=tokens.layout, budget=tokens.budget, layer_space=tokens.layer_space)

    def tower_grids(self, inputs: dict[str, Any]) -> list[list[tuple[int, int]]]:
        """One pass per partition (base + crops; the base only for prompts with several images)."""
        if inputs.get("image_sizes") is None:
            return super().tower_grids(inputs)
        _, parts = self.plan(inputs)
        out, i = [], 0
        for k in self.images_per_prompt(inputs):
            out.append([self.grid] * sum(parts[i:i + k]))
            i += k
        return out


def _take(t: Tensor, tok: Tensor, is_tok: Tensor, fill: Tensor | float) -> Tensor:
    """``t[tok]`` where ``is_tok`` (a kept token's slot), ``fill`` elsewhere (a newline's); ``t`` may be empty."""
    g = t[tok] if len(t) else t.new_zeros((len(tok), *t.shape[1:]))
    fill = fill if isinstance(fill, Tensor) else torch.full_like(g, fill)
    return torch.where(is_tok.view(-1, *([1] * (g.dim() - 1))), g, fill)
