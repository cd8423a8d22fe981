"""Pool baseline: average-pool each partition's token grid to a smaller grid.

``pool:keep=64`` pools a 24x24 grid to 8x8. For a budget ``k`` on an ``h x w`` grid the target is
``gh = floor(sqrt(k*h/w))`` rows (at least 1, at most ``h`` and at most ``k``) and
``gw = min(w, k // gh)`` columns (at least 1), so at most ``k`` tokens come out (``keep=128`` on
24x24 gives 11x11 = 121; ``keep=1`` on a 4x1 grid gives 1x1); ``grid=[gh, gw]`` (or
``grid=6``) asks for a target grid directly (per partition). ``keep``/``ratio`` count tokens per
image: an image holding ``P`` partitions without per-partition budgets gives each ``k // P``
(LLaVA-NeXT with 5 partitions and ``ratio=0.25``: 720 of 2880 tokens, 12x12 per partition). Windows do not overlap (see ``vtc.ops.pooling``).
Applied to a vanilla model this is the training-free form of Matryoshka (M3) pooling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vtc.errors import BudgetError, ConfigError
from vtc.geometry import pooled_layouts
from vtc.ops.base import SelectConfig, Selector
from vtc.ops.pooling import complete_grid, pool_complete_grid, pool_to_grid
from vtc.registry import register
from vtc.tokens import VisualTokens


@dataclass
class PoolConfig(SelectConfig):
    """``grid``: target grid ``[gh, gw]`` or a side (instead of keep/ratio)."""

    grid: list[int] | None = None

    def __post_init__(self) -> None:
        if self.grid is not None:
            if self.keep is not None or self.ratio is not None:
                raise ConfigError("pool takes grid= or keep=/ratio=, not both")
            if len(self.grid) == 1:
                self.grid = [self.grid[0], self.grid[0]]
            if len(self.grid) != 2 or min(self.grid) < 1:
                raise ConfigError(f"pool grid= must be one or two positive ints, got {self.grid}")
        super().__post_init__()


@register("pool")
class Pool(Selector):
    sees_padding = True  # pools whole partitions, as LLaVA-NeXT-M3 does before unpadding
    Config = PoolConfig
    default_stage = "llm"

    def own_budget_args(self) -> list[str]:
        return super().own_budget_args() + (["grid"] if self.config.grid is not None else [])

    int_budget = True

    def resolve_keep(self, counts: Tensor | int) -> Tensor | int:
        if self.config.grid is not None:
            gh, gw = self.config.grid
            return min(gh * gw, counts) if isinstance(counts, int) else counts.clamp_max(gh * gw)
        return super().resolve_keep(counts)

    def _budget_error(self, parts: int, k: int, b: int = 0) -> BudgetError:
        return BudgetError(
            f"pool keeps at least one token per partition, but image {b} holds {parts} partitions "
            f"and its budget is {k} tokens; raise keep/ratio, or put an allocator (hired, "
            "globalcom2) before pool to set per-partition budgets"
        )

    def select(self, tokens: VisualTokens, k: Tensor | int) -> VisualTokens:
        if isinstance(k, int):
            grid = complete_grid(tokens)
            if grid is not None:  # every cell present: a fixed-size pooling, no host sync
                P, h, w = grid
                if self.config.grid is not None:
                    gh, gw = min(self.config.grid[0], h), min(self.config.grid[1], w)
                else:
                    if k < P:
                        raise self._budget_error(P, k)
                    gh, gw = target_grid(k // P, h, w)
                out = pool_complete_grid(tokens, P, h, w, gh, gw)
                return out.replace(layout=pooled_layouts(tokens, [gh] * tokens.batch_size, [gw] * tokens.batch_size))
            k = torch.full((tokens.batch_size,), k, dtype=torch.long, device=tokens.device)
        _, _, h, w = tokens.grid_position()
        h, w = h[:, 0], w[:, 0]
        if self.config.grid is not None:
            gh = torch.full_like(k, self.config.grid[0]).clamp_max(h)
            gw = torch.full_like(k, self.config.grid[1]).clamp_max(w)
        else:
            # keep= / ratio= count tokens per image: an image holding several partitions (AnyRes,
            # no allocator) shares its budget evenly among them, each pooled to the same grid
            parts = _partitions_present(tokens)
            short = (k > 0) & (k < parts)
            if bool(short.any()):
                b = int(short.nonzero()[0])
                raise self._budget_error(int(parts[b]), int(k[b]), b)
            kk = (k // parts).clamp_min(1)
            gh = torch.floor(torch.sqrt(kk.double() * h / w)).long().clamp_min(1)
            gh = torch.minimum(torch.minimum(gh, h), kk)
            gw = torch.minimum(kk // gh, w).clamp_min(1)
        out = pool_to_grid(tokens, gh, gw).replace(layout=pooled_layouts(tokens, gh, gw, k < tokens.counts))
        if bool((k == 0).any()):  # a partition whose budget is 0 keeps nothing
            out = out.keep_mask((k > 0).unsqueeze(1).expand(out.x.shape[:2]))
        return out


def target_grid(k: int, h: int, w: int) -> tuple[int, int]:
    """``(gh, gw)`` for a budget of ``k >= 1`` tokens on an ``h x w`` grid (see the module docstring)."""
    gh = min(max(math.floor(math.sqrt(k * h / w)), 1), h, k)
    return gh, max(min(k // gh, w), 1)


def _partitions_present(tokens: VisualTokens) -> Tensor:
    """``[B]`` long: how many distinct partitions each image's valid tokens come from (at least 1)."""
    if tokens.group is None:
        return torch.ones(tokens.batch_size, dtype=torch.long, device=tokens.device)
    valid = tokens.valid
    G = int(tokens.group[valid].max().item()) + 1 if bool(valid.any()) else 1
    seen = torch.zeros(tokens.batch_size, G + 1, dtype=torch.bool, device=tokens.device)
    seen.scatter_(1, torch.where(valid, tokens.group, torch.full_like(tokens.group, G)), True)
    return seen[:, :G].sum(1).clamp_min(1)
