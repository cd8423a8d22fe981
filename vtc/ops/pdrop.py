"""PyramidDrop: drop visual tokens in stages, ranked by the last instruction token's attention.

Paper: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction" (Xing et al., CVPR 2025).

The decoder is cut into stages; after the last layer of each stage (``layers``) the visual tokens
are ranked by the softmax attention (mean over heads) from the last instruction token (the last
prompt token) to each of them, computed for that one row, and the top ``int(ratio_i * n_in)`` are
kept, where ``n_in`` is the number of visual tokens the LLM received (the ratios are cumulative
fractions of the input, not of the previous stage). Text is never dropped. Ties: earlier position.

Defaults (LLaVA-1.5-7B, 32 layers, the official scripts): ``layers=[8, 16, 24]``,
``ratios=[0.5, 0.25, 0.125]``. Without ``layers=`` the list scales to the model's depth as
``int(l * num_layers / 32)`` (28 layers: 7, 14, 21). ``ratios`` of 1.0 keep everything.

Not verified against the official code (its README gives only the layer and ratio lists): the
head aggregation (vtc: mean) and whether the ranking row is taken from layer ``l``'s own attention
with tokens dropped after it (vtc, the paper's "at the end of each stage") or from layer ``l``'s
q/k before it runs (one layer earlier for the drop). Position ids: ``"original"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from vtc.errors import ConfigError
from vtc.ops.llm_layer import LayerConfig, LayerContext, LayerOperator, floor_count, keep_top_visual, scaled_layers
from vtc.registry import register

_REF_LAYERS, _REF_DEPTH = [8, 16, 24], 32


@dataclass
class PDropConfig(LayerConfig):
    """``ratios[i]``: fraction of the LLM's input visual tokens kept after ``layers[i]``."""

    ratios: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ratios or any(not 0.0 <= r <= 1.0 for r in self.ratios):
            raise ConfigError(f"pdrop ratios are fractions in [0, 1], one per layer, got {self.ratios}")
        if self.layers is not None and len(self.layers) != len(self.ratios):
            raise ConfigError(f"pdrop needs one ratio per layer: layers={self.layers}, ratios={self.ratios}")


@register("pdrop")
class PDrop(LayerOperator):
    Config = PDropConfig
    default_position_ids = "original"

    def default_layers(self, num_layers: int) -> list[int]:
        if len(self.config.ratios) != len(_REF_LAYERS):
            raise ConfigError(f"pdrop with {len(self.config.ratios)} ratios needs layers= (one per ratio)")
        layers = scaled_layers(_REF_LAYERS, _REF_DEPTH, num_layers)
        if len(set(layers)) != len(layers):
            raise ConfigError(f"pdrop cannot scale layers {_REF_LAYERS} to a {num_layers}-layer model; give layers=")
        return layers

    def ratio_at(self, layer: int, num_layers: int) -> float:
        layers = self.config.layers if self.config.layers is not None else self.default_layers(num_layers)
        resolved = [l + num_layers if l < 0 else l for l in layers]
        return self.config.ratios[resolved.index(layer)]

    def kept_visual(self, layer: int, alive: Tensor, visual_in: Tensor, num_layers: int) -> Tensor:
        return torch.minimum(alive, floor_count(visual_in, self.ratio_at(layer, num_layers)))

    def decide(self, ctx: LayerContext) -> Tensor:
        k = self.kept_visual(ctx.layer, ctx.visual_counts, ctx.visual_in, ctx.num_layers)
        scores = ctx.attention_rows(ctx.last.unsqueeze(1)).mean(1)[:, 0]
        return keep_top_visual(ctx, scores, k)
