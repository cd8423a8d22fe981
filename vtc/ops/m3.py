"""M3 (Matryoshka Multimodal Models) nested average pooling of the visual token grid.

Paper: "Matryoshka Multimodal Models" (Cai et al., ICLR 2025). Described in methods.md §5b.

``m3:keep=s`` average-pools every partition's ``h x h`` grid (24x24 for LLaVA) to ``sqrt(s) x
sqrt(s)`` with kernel = stride = ``h / sqrt(s)``, after the projector (stage ``llm``). For 24x24 the
scales are s ∈ {576, 144, 36, 9, 1} (kernels 1, 2, 4, 8, 24), exactly nested: each coarse token is
the mean of its children at the next finer scale. Any square ``s`` whose side divides the grid
side is accepted; a ``keep`` of at least a partition's token count leaves it as it is (no-op).
With AnyRes partitions (``group``), each partition is pooled on its own, as LLaVA-NeXT-M3 does
before its assembly. Without a layout a square grid is assumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtc.errors import ConfigError, LayoutError
from vtc.geometry import pooled_layouts
from vtc.ops.base import OpConfig, Operator
from vtc.ops.pooling import complete_grid, pool_complete_grid, pool_to_grid
from vtc.registry import register
from vtc.tokens import VisualTokens


@dataclass
class M3Config(OpConfig):
    """``keep``: tokens per partition, a square whose side divides the grid side (576/144/36/9/1)."""

    keep: int = 576

    def __post_init__(self) -> None:
        super().__post_init__()
        side = math.isqrt(self.keep) if self.keep > 0 else 0
        if self.keep <= 0 or side * side != self.keep:
            raise ConfigError(f"m3 keep= must be a positive square (576, 144, 36, 9, 1 for 24x24), got {self.keep}")


@register("m3")
class M3(Operator):
    sees_padding = True  # pools whole partitions, as LLaVA-NeXT-M3 does before unpadding
    Config = M3Config
    default_stage = "llm"
    anyres_view = "partitions"

    def forward(self, tokens: VisualTokens) -> VisualTokens:
        side = math.isqrt(self.config.keep)
        grid = complete_grid(tokens)
        if grid is not None:  # every cell present: avg_pool2d, as the official code, no host sync
            P, h, w = grid
            if h != w:
                raise LayoutError("m3 pools square grids; these tokens' partitions are not square")
            if h <= side:
                return tokens  # keep >= the tokens present: nothing to pool
            if h % side:
                raise self._scale_error(h)
            out = pool_complete_grid(tokens, P, h, w, side, side)
            return out.replace(layout=pooled_layouts(tokens, [side] * tokens.batch_size, [side] * tokens.batch_size))
        _, _, h, w = tokens.grid_position()
        hv, wv = h[tokens.valid], w[tokens.valid]
        if hv.numel() == 0:
            return tokens
        if bool((hv != wv).any()):
            raise LayoutError("m3 pools square grids; these tokens' partitions are not square")
        if bool((hv <= side).all()):
            return tokens  # keep >= the tokens present: nothing to pool
        bad = (hv % side != 0) | (hv < side)
        if bool(bad.any()):
            raise self._scale_error(int(hv[bad][0]))
        g = torch.full((tokens.batch_size,), side, dtype=torch.long, device=tokens.device)
        return pool_to_grid(tokens, g, g).replace(layout=pooled_layouts(tokens, g, g))

    def _scale_error(self, h: int) -> ConfigError:
        side = math.isqrt(self.config.keep)
        return ConfigError(
            f"m3 keep={self.config.keep} needs a grid side divisible by {side}, but a partition is "
            f"{h}x{h}; valid keep values: {[d * d for d in range(h, 0, -1) if h % d == 0]}"
        )
