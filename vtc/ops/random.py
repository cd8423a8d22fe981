"""Random baseline: keep a seeded, reproducible random subset of tokens.

Each token gets a pseudo-random score from an integer hash of ``(seed, original index)`` and the
top ``k`` are kept in their original order. The choice therefore depends only on the seed, the
tokens' original positions and the budget: it is identical whether an image runs alone or in a
batch, on CPU or GPU, and across runs. (So two images with the same token positions and budget
keep the same positions: a fixed random mask per budget, as in FastV's K=0 ablation.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtc.ops.base import SelectConfig, Selector
from vtc.ops.selection import keep_top
from vtc.registry import register
from vtc.tokens import VisualTokens

_M32 = 0xFFFFFFFF


def hash_scores(index: Tensor, seed: int) -> Tensor:
    """Uniform-looking scores in [0, 1) from int64 ``index`` and ``seed`` (32-bit integer hash)."""
    h = (index.long() + (int(seed) & _M32) * 0x9E3779B) & _M32
    for _ in range(2):
        h = (((h >> 16) ^ h) * 0x45D9F3B) & _M32  # both factors < 2**32 and 2**27: no int64 overflow
    h = (h >> 16) ^ h
    return h.to(torch.float64) / 2.0**32


@dataclass
class RandomConfig(SelectConfig):
    """``seed``: which random subset (any int)."""

    seed: int = 0


@register("random")
class RandomSelect(Selector):
    Config = RandomConfig
    default_stage = "vision"

    int_budget = True

    def select(self, tokens: VisualTokens, k: Tensor | int) -> VisualTokens:
        return keep_top(tokens, hash_scores(tokens.index, self.config.seed), k)
