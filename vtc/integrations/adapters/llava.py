"""LLaVA-1.5: transformers' ``LlavaForConditionalGeneration``.

The tower (a CLIP or SigLIP vision model) runs once per image; its feature-layer patch tokens
(``vision_feature_layer``, ``vision_feature_select_strategy``: ``"default"`` drops the CLS token)
form one ``h x w`` grid (``Layout.grid``; 24x24 = 576 tokens for CLIP-L/336). Vision-stage
operators see them with the tap's signals, the model's ``multi_modal_projector`` maps what they
keep to the language model's width, llm-stage operators follow (:mod:`vtc.integrations.stages`).
Each ``<image>`` placeholder run in ``input_ids`` holds ``h*w`` tokens; positions are 1-D. An
operator that keeps the tower's CLS token (VisionZip official) gets it as the first token of each
image (:mod:`vtc.integrations.cls_token`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from vtc.errors import InputError
from vtc.integrations import cls_token
from vtc.integrations.adapters import register_adapter
from vtc.integrations.adapters.base import Encoded, ModelAdapter
from vtc.integrations.signals import open_tap, tokens_from
from vtc.integrations.stages import replaces_projector
from vtc.integrations.towers import feature_tokens, hidden_states, prefix_tokens
from vtc.tokens import Layout

__all__ = ["LlavaAdapter"]


@register_adapter
class LlavaAdapter(ModelAdapter):
    family = "llava"
    class_names = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)
    supports_llm_layer = True
    #: whether this family hands a CLIP tower's CLS token to an operator that keeps it (VisionZip official)
    hands_cls_token: ClassVar[bool] = True

    @property
    def grid(self) -> tuple[int, int]:
        """The tower's patch grid ``(h, w)``."""
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size, vc.image_size // vc.patch_size

    def bind(self, pipeline: Any, options: Any, handle: Any) -> None:
        super().bind(pipeline, options, handle)
        replaces_projector(pipeline)  # a misplaced projector-replacing operator fails here, not at the first call
        self.has_vision_ops = any(op.stage == "vision" for op in pipeline)
        self.requires = pipeline.requires
        has_cls = (self.hands_cls_token and prefix_tokens(self.vision_tower) == 1
                   and self.config.vision_feature_select_strategy == "default")
        self.cls_token = cls_token.wanted(pipeline, self.family, has_cls)
        self.tap = open_tap(self.vision_tower, self.requires, who=f"the pipeline {pipeline}",
                            feature_layer=self.feature_layer())
        if self.tap is not None:
            handle.on_remove(self.tap.remove)

    def feature_layer(self) -> int | None:
        """The tower layer LLaVA's features come from (``vision_feature_layer`` is a ``hidden_states``
        index: -2 is layer 22 of CLIP-L's 24); the last one when several are concatenated."""
        from vtc.integrations.towers import num_blocks
        from vtc.taps.layers import hidden_state_layer

        layer = self.config.vision_feature_layer
        layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
        return hidden_state_layer(int(layer), num_blocks(self.vision_tower))

    def feature_selection(self, kw: dict[str, Any]) -> tuple[Any, str]:
        """``(vision_feature_layer, vision_feature_select_strategy)`` of a call (else the config's)."""
        cfg = self.config
        layer = kw.get("vision_feature_layer")
        layer = cfg.vision_feature_layer if layer is None else layer
        return layer, kw.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy

    def features(self, pixel_values: Tensor, kw: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Feature-layer patch tokens ``[images, N, D]``, and the CLS token's ``[images, D]`` when the
        pipeline takes it (else None); the tap (attached until remove()) records this forward's signals."""
        layer, strategy = self.feature_selection(kw)
        if not self.cls_token:
            return feature_tokens(self.vision_tower, pixel_values, layer, 1 if strategy == "default" else 0), None
        if strategy != "default":
            raise InputError(f"the pipeline keeps the tower's CLS token, which vision_feature_select_strategy "
                             f"{strategy!r} does not separate from the patches; call with 'default'")
        hs = hidden_states(self.vision_tower, pixel_values, layer)
        return torch.cat([h[:, 1:] for h in hs], -1), torch.cat([h[:, 0] for h in hs], -1)

    def encode(self, kw: dict[str, Any]) -> Encoded:
        pixel_values = kw["pixel_values"]
        if pixel_values.dim() != 4:
            raise InputError(f"LLaVA pixel_values must be [images, 3, H, W], got {tuple(pixel_values.shape)}")
        h, w = self.grid
        feats, cls = self.features(pixel_values, kw)
        n = feats.shape[1]
        layout = Layout.grid(h, w) if n == h * w else None
        tokens = tokens_from(feats, self.tap, self.requires, layout)
        if cls is not None:
            tokens = cls_token.insert(tokens, cls.unsqueeze(1))
        out = self.run_pipeline(tokens, self.projector, out_dim=self.text_width)
        return Encoded(out, [n] * feats.shape[0])
