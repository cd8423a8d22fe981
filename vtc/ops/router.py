"""A learned in-LLM scorer: a linear router on the hidden states decides which visual tokens stay.

The shape of the trained in-LLM methods, as an ``llm_layer`` operator: p-MoD ("p-MoD: Building
Mixture-of-Depths MLLMs via Progressive Ratio Decay", Zhang et al., ICCV 2025) scores each vision
token with a per-layer ``Linear(d, 1)`` router (zero-initialised) and keeps the top
``int(n * ratio_l)``; ATP-LLaVA ("ATP-LLaVA: Adaptive Token Pruning for Large Vision Language
Models", Ye et al., CVPR 2025) learns per-layer thresholds on learned scores. This operator reads
only ``ctx.hidden`` (``needs_attention = False``: the integration captures no q/k), keeps the top
``int(n_in * ratios[i])`` visual tokens by ``router_i(hidden)`` after ``layers[i]`` (ties: the
earlier position, so the untrained zero router keeps the first tokens), and holds its routers as
parameters (``dim`` = the LLM's hidden size), so it can be trained and saved like any module.

What it does not do yet: p-MoD's routers are Mixture-of-Depths, not pruning: a token skipped at
layer ``l`` bypasses only that layer (its delta scaled by ``0.2 * tanh(logit) + 1``) and may be
processed again at ``l + 1``. That needs one more integration mode (run a layer on a subset and
pass the rest through), not a different operator contract: the router and the keep rule stay.
This module carries no trained weights. Training one on the embedded tiny-llava (4 decoder
layers of width 128, 576 visual tokens) takes: (1) the router in the model's forward, which
``vtc.apply`` already gives (:mod:`vtc.integrations.llm_layer` calls it after its layers with that
layer's hidden states, like any in-LLM operator; the kept tokens' hidden states are gathered, so
gradients reach the layers, but not the router through its top-k); (2) a differentiable path to the router, since a top-k keep has no gradient:
p-MoD's (the kept tokens' layer delta scaled by ``0.2 * tanh(logit) + 1``, which needs the
"process a subset" mode above), or a straight-through / Gumbel top-k, or, cheapest, distillation:
regress the router's logits on the uncompressed model's attention-derived importance (the last
prompt row, as FastV scores) with the LLM frozen, which needs no backward pass through the LLM;
(3) the embedded models' training data and script (``vtc/models/tiny``) with the router's
``parameters()`` as the only trainable ones (129 per layer) and the answer loss at a fixed keep
ratio, a few thousand CPU steps like the projector runs; (4) saving its ``state_dict`` under
assets/ and a ``weights=`` argument here to load it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vtc.errors import ConfigError
from vtc.ops.llm_layer import LayerConfig, LayerContext, LayerOperator, floor_count, keep_top_visual
from vtc.registry import register


@dataclass
class RouterConfig(LayerConfig):
    """``dim``: the LLM's hidden size; ``layers``/``ratios``: keep ``int(n_in * ratio)`` after each layer."""

    dim: int | None = None
    ratios: list[float] = field(default_factory=lambda: [0.5])

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dim is None:
            raise ConfigError("router needs dim= (the language model's hidden size)")
        if self.dim < 1 or not self.ratios or any(not 0.0 <= r <= 1.0 for r in self.ratios):
            raise ConfigError(f"router needs dim >= 1 and ratios in [0, 1], got dim={self.dim}, ratios={self.ratios}")
        if self.layers is not None and len(self.layers) != len(self.ratios):
            raise ConfigError(f"router needs one ratio per layer: layers={self.layers}, ratios={self.ratios}")


@register("router")
class Router(LayerOperator):
    Config = RouterConfig
    needs_attention = False
    default_position_ids = "original"

    def __init__(self, config=None, /, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.routers = nn.ModuleList(nn.Linear(self.config.dim, 1) for _ in self.config.ratios)
        for r in self.routers:  # p-MoD's zero initialisation: every token scores the same until trained
            nn.init.zeros_(r.weight)
            nn.init.zeros_(r.bias)

    def default_layers(self, num_layers: int) -> list[int]:
        if len(self.config.ratios) != 1:
            raise ConfigError("router with several ratios needs layers= (one per ratio)")
        return [num_layers // 2]

    def _slot(self, layer: int, num_layers: int) -> int:
        return self.resolve_layers(num_layers).index(layer)

    def kept_visual(self, layer: int, alive: Tensor, visual_in: Tensor, num_layers: int) -> Tensor:
        return torch.minimum(alive, floor_count(visual_in, self.config.ratios[self._slot(layer, num_layers)]))

    def decide(self, ctx: LayerContext) -> Tensor:
        k = self.kept_visual(ctx.layer, ctx.visual_counts, ctx.visual_in, ctx.num_layers)
        router = self.routers[self._slot(ctx.layer, ctx.num_layers)]
        scores = router(ctx.hidden.to(router.weight.dtype)).squeeze(-1)
        return keep_top_visual(ctx, scores, k)
