"""FastV: drop the visual tokens the last prompt token attends to least, once, early in the LLM.

Paper: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for
Large Vision-Language Models" (Chen et al., ECCV 2024).

With ``K`` and ``R``: the attention of decoder layer ``K-1`` (softmax, averaged over heads) from the
last prompt token's query to each visual token ranks the visual tokens; the top
``int((1 - R) * n)`` of the ``n`` alive ones are kept and the rest are dropped before layer ``K``.
Text is never dropped. Stage ``llm_layer`` at ``layers=[K-1]`` (vtc's convention: an operator runs
after the layer whose attention it reads). ``R=0`` keeps everything. Ties: the earlier position.

Defaults: ``K=2``, ``R=0.5`` (the paper's setting; its lmms-eval table also reports ``K=3``).
Official behaviour kept: the surviving tokens keep their original position ids, with gaps
(``position_ids == "original"``: the integration's policy, read from the operator); pruning
happens once, at prefill, and decoding uses the pruned cache. Not reproduced: the official code
ranks with the attention of batch element 0 for every element of a batch (a batch-1 shortcut);
vtc ranks each sequence by its own attention. The official "mask" variant (attention-masking
instead of removing, used for some ablations, random at ``K=0``) is not offered: ``K >= 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from vtc.errors import ConfigError
from vtc.ops.llm_layer import LayerConfig, LayerContext, LayerOperator, floor_count, keep_top_visual
from vtc.registry import register


@dataclass
class FastVConfig(LayerConfig):
    """``K``: tokens are dropped before decoder layer K (scores from layer K-1); ``R``: fraction dropped."""

    K: int = 2
    R: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            raise ConfigError(f"fastv takes K= (it runs after layer K-1), not layers= (got layers={self.layers})")
        if self.K < 1:
            raise ConfigError(f"fastv K must be >= 1 (scores come from layer K-1), got K={self.K}")
        if not 0.0 <= self.R < 1.0:
            raise ConfigError(f"fastv R is the fraction of visual tokens dropped, in [0, 1), got R={self.R}")


@register("fastv")
class FastV(LayerOperator):
    Config = FastVConfig
    default_position_ids = "original"

    def default_layers(self, num_layers: int) -> list[int]:
        return [self.config.K - 1]

    def kept_visual(self, layer: int, alive: Tensor, visual_in: Tensor, num_layers: int) -> Tensor:
        return floor_count(alive, 1.0 - self.config.R)

    def decide(self, ctx: LayerContext) -> Tensor:
        k = self.kept_visual(ctx.layer, ctx.visual_counts, ctx.visual_in, ctx.num_layers)
        scores = ctx.attention_rows(ctx.last.unsqueeze(1)).mean(1)[:, 0]  # [B, L]: head-mean, last prompt row
        return keep_top_visual(ctx, scores, k)
