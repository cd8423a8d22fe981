"""HiPrune: keep object anchors, their grid neighbours, and the tokens a deep layer attends to.

Paper: "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision
Encoders" (2025). Stage ``vision``, scores from the attention each token *receives*
(``attn_received[l]``: the column mean of the softmax map over all query rows, head-mean; not CLS
attention), at two tower layers:

1. anchors: the top ``round(k * alpha / 5)`` tokens by the middle ("object") layer's score;
2. buffers: each anchor's neighbours ``t - 1``, ``t + 1``, ``t - w``, ``t + w`` in its partition's
   grid of width ``w`` (from ``layout``; 24 for LLaVA's 24x24 grid), merged with the anchors;
3. registers: the remaining ``k - |anchors and buffers|`` tokens by the deep layer's score, taken
   after subtracting 1 from the score of every token already chosen.

The kept tokens are returned in raster order. Defaults (official): ``alpha=0.1``,
``object_layer="1/3"`` (the layer a third of the way up the tower, ``floor(L/3)``: layer 8 of
CLIP-L's 24, where the official ``HIPRUNE_OBJECT_LAYER=9`` reads ``attentions[8]``; 1 of a
4-layer tower, 10 of a 32-layer one), ``deep_layer="feature"`` (the layer whose output the model
uses: LLaVA-1.5's 22). Layer forms: :mod:`vtc.taps.layers`. Budgets in the paper: 192/128/64 for LLaVA-1.5,
640/320/160 for LLaVA-NeXT, split equally over the partitions (``int(k / P)``, ``per_partition=True``),
with the ``spatial`` merge (no unpadding, no newline tokens: under ``compat="official"`` the
operator declares ``newline_policy = "none"`` and ``sees_padding``; pass ``vtc.apply(...,
unpad=False)`` for the padded grid as well).

``compat="official"`` (default): buffers are raster indices ``t +- 1`` and ``t +- w`` clamped to the
partition's ``[0, h*w - 1]``, so ``t +- 1`` wraps to the previous/next row at the grid's edges, and
the register step ranks all tokens with the chosen ones lowered by 1. ``compat="clean"``: only true
grid neighbours (same row for +-1, inside the grid), the remainder of a floored per-partition split
handed out, and registers drawn from the unchosen tokens only. Ties: the earlier position (the
official ``topk`` order is unspecified). If anchors and buffers would exceed ``k`` (only when
``alpha`` is near 1) the anchor count is lowered to ``k // 5``; the official code fails there.
Tokens that are not present (an earlier operator dropped them) cannot be buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vtc.errors import ConfigError
from vtc.ops.base import SelectConfig, Selector
from vtc.ops.budgets import OfficialSpatialMerge, PerPartition
from vtc.ops.selection import descending_order, mask_from_order
from vtc.registry import register
from vtc.taps.layers import Layer, check_layer, sorted_layers
from vtc.tokens import VisualTokens


@dataclass
class HiPruneConfig(SelectConfig):
    """See the module docstring for each argument."""

    alpha: float = 0.1
    object_layer: Layer = "1/3"
    deep_layer: Layer = "feature"
    compat: Literal["official", "clean"] = "official"
    per_partition: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer(self.object_layer, "hiprune.object_layer")
        check_layer(self.deep_layer, "hiprune.deep_layer")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"hiprune alpha is the share of the budget spent on anchors and buffers, in [0, 1], "
                              f"got {self.alpha}")


@register("hiprune")
class HiPrune(OfficialSpatialMerge, PerPartition, Selector):
    Config = HiPruneConfig
    default_stage = "vision"

    @property
    def requires(self) -> dict[str, list[int]]:
        return {"attn_received": sorted_layers({self.config.object_layer, self.config.deep_layer})}

    def anchors(self, k: Tensor) -> Tensor:
        """``[B]`` anchor counts ``round(k * alpha / 5)`` (half to even), at most ``k // 5``."""
        return torch.minimum(torch.round(k.double() * self.config.alpha / 5).long(), k // 5)

    def select(self, tokens: VisualTokens, k: Tensor) -> VisualTokens:
        cfg = self.config
        official = cfg.compat == "official"
        B, N = tokens.x.shape[:2]
        valid = tokens.valid
        obj = tokens.signal("attn_received", cfg.object_layer, op="operator 'hiprune'").float()
        deep = tokens.signal("attn_received", cfg.deep_layer, op="operator 'hiprune'").float()
        anchor = mask_from_order(descending_order(obj, valid), self.anchors(k)) & valid
        chosen = anchor | (_buffers(tokens, anchor, official) & valid)
        rest = (k - chosen.sum(1)).clamp_min(0)
        if official:
            reg = mask_from_order(descending_order(deep - chosen.to(deep.dtype), valid), rest)
        else:
            reg = mask_from_order(descending_order(deep, valid & ~chosen), rest)
        return tokens.keep_mask(chosen | (reg & valid))


def _buffers(tokens: VisualTokens, anchor: Tensor, official: bool) -> Tensor:
    """``[B, N]`` bool: the present tokens that neighbour an anchor in its partition's grid."""
    B, N = anchor.shape
    dev = anchor.device
    row, col, h, w = tokens.grid_position()
    local = row * w + col
    start = tokens.index - local  # original index of the partition's first cell
    if official:
        nb = torch.stack([(local + d).clamp(torch.zeros_like(h), h * w - 1) for d in (-1, 1)]
                         + [(local + d * w).clamp(torch.zeros_like(h), h * w - 1) for d in (-1, 1)], -1)
        ok = torch.ones_like(nb, dtype=torch.bool)
    else:
        rr = torch.stack([row, row, row - 1, row + 1], -1)
        cc = torch.stack([col - 1, col + 1, col, col], -1)
        ok = (rr >= 0) & (rr < h.unsqueeze(-1)) & (cc >= 0) & (cc < w.unsqueeze(-1))
        nb = (rr * w.unsqueeze(-1) + cc).clamp_min(0)
    want = start.unsqueeze(-1) + nb  # [B, N, 4] original indices
    ok = ok & anchor.unsqueeze(-1)
    n_orig = int(torch.maximum(tokens.index.max(), want.max()).item()) + 1
    # original index -> position of the present token holding it (a token's index is unique in its image)
    where = torch.full((B, n_orig + 1), -1, dtype=torch.long, device=dev)
    idx = torch.where(tokens.valid, tokens.index, torch.full_like(tokens.index, n_orig))
    where.scatter_(1, idx, torch.arange(N, device=dev).expand(B, N))
    hit = where.gather(1, torch.where(ok, want, torch.full_like(want, n_orig)).flatten(1))  # [B, 4N]
    out = torch.zeros(B, N + 1, dtype=torch.bool, device=dev)
    out.scatter_(1, torch.where(hit >= 0, hit, torch.full_like(hit, N)), True)
    return out[:, :N]
