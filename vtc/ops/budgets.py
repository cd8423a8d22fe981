"""Integer apportionment of a token budget across partitions (the allocators' ``compat="clean"`` rule).

:func:`apportion` splits ``total`` tokens in proportion to non-negative integer weights by the
largest remainder method (floors first, then one more token to the largest remainders, ties to
the lower partition), in exact integer arithmetic, never giving a partition more than its
capacity: a capped partition's excess is re-apportioned among the others by the same rule. The
result sums to ``min(total, sum(capacity))``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def apportion(weights: Tensor, total: Tensor, capacity: Tensor) -> Tensor:
    """``[B, C]`` long counts: ``total[b]`` split over ``C`` partitions by integer ``weights`` ``[B, C]``.

    Partitions with ``capacity == 0`` get nothing; when every open partition has weight 0 the
    split is equal among them.
    """
    B, C = weights.shape
    w = weights.long().clamp_min(0)
    cap = capacity.long().clamp_min(0)
    out = torch.zeros(B, C, dtype=torch.long, device=weights.device)
    left = torch.minimum(total.long(), cap.sum(1))
    col = torch.arange(C, device=weights.device).unsqueeze(0)
    for _ in range(C + 1):  # each round fills a partition to capacity or hands out everything
        # (a round with nothing left to hand out changes nothing: no early exit, so no host sync)
        open_ = out < cap
        ww = torch.where(open_, w, torch.zeros_like(w))
        ww = torch.where((ww.sum(1, keepdim=True) == 0) & open_, torch.ones_like(ww), ww)
        den = ww.sum(1, keepdim=True).clamp_min(1)
        num = ww * left.unsqueeze(1)
        base = num // den
        rem = torch.where(open_, num % den, torch.full_like(num, -1))
        rank = torch.sort(rem, dim=1, descending=True, stable=True).indices
        extra = torch.zeros_like(base).scatter_(1, rank, (col < (left - base.sum(1)).unsqueeze(1)).long())
        new = torch.minimum(out + base + extra, cap)
        left = left - (new - out).sum(1)
        out = new
    return out


def equal_split(k: Tensor, partitions: Tensor, capacity: Tensor, *, floor: bool) -> Tensor:
    """``[B, G]`` long: ``k[b]`` tokens split equally over image ``b``'s ``partitions[b]`` partitions.

    ``capacity [B, G]``: tokens present per partition. ``floor=True`` gives each ``k // P`` (the
    remainder is unused, as official per-partition budgets ``int(N / P)`` do), except that an image
    whose share rounds to 0 gives one token to its first partition holding tokens, so that it is
    not emptied; ``floor=False`` apportions ``k`` equally by largest remainder within the capacities
    (:func:`apportion`), so the budgets sum to ``min(k, tokens present)``. Columns past an image's
    partitions get 0.
    """
    B, G = capacity.shape
    P = partitions.long().clamp_min(1).unsqueeze(1)
    col = torch.arange(G, device=k.device).unsqueeze(0)
    kk = k.long().unsqueeze(1)
    base = (kk // P).expand(B, G)
    if floor:
        has = capacity > 0
        first = torch.where(has, col, torch.full_like(col, G)).min(1, keepdim=True).values
        out = torch.where((base == 0) & (kk > 0) & (col == first), torch.ones_like(base), base)
    else:
        open_ = (col < P) & (capacity > 0)
        return apportion(open_.long(), k, torch.where(col < P, capacity, torch.zeros_like(capacity)))
    return torch.where(col < P, out, torch.zeros_like(out))


def partitions_per_image(tokens) -> Tensor:
    """``[B]`` long: partitions of each image (from its layout, else from the ``group`` ids present)."""
    lays = tokens.layouts()
    if all(lay is not None for lay in lays):
        return torch.tensor([lay.num_partitions for lay in lays], dtype=torch.long, device=tokens.device)
    if tokens.group is None:
        return torch.ones(tokens.batch_size, dtype=torch.long, device=tokens.device)
    g = tokens.group.masked_fill(~tokens.valid, 0)
    return g.max(1).values + 1


def partition_counts(tokens) -> Tensor:
    """``[B, G]`` long: valid tokens per (image, partition)."""
    G = tokens.num_groups
    g = tokens.group if tokens.group is not None else torch.zeros_like(tokens.index)
    g = torch.where(tokens.valid, g, torch.full_like(g, G))
    out = torch.zeros(tokens.batch_size, G + 1, dtype=torch.long, device=tokens.device)
    return out.scatter_add_(1, g, torch.ones_like(g))[:, :G]


class PerPartition:
    """Mixin for a :class:`~vtc.ops.base.Selector` whose method runs on each partition (each AnyRes
    crop) separately: with ``config.per_partition`` and several partitions (and no allocator
    budget), :meth:`partition_budget` sets per-partition budgets and the selector runs per partition.
    By default each image's budget is split equally (:func:`equal_split`, floored under
    ``compat="official"``)."""

    def partition_budget(self, tokens) -> Tensor:
        P = partitions_per_image(tokens)
        k = self.resolve_keep(tokens.counts)
        return equal_split(k, P, partition_counts(tokens), floor=getattr(self.config, "compat", "official") == "official")

    def forward(self, tokens):
        if getattr(self.config, "per_partition", False) and tokens.budget is None and tokens.num_groups > 1:
            tokens.check_finite(f"operator {self.name!r}")
            out = super().forward(tokens.replace(budget=self.partition_budget(tokens)))
            return out.replace(budget=None)
        return super().forward(tokens)


class OfficialSpatialMerge:
    """Mixin for a ViT-attention selector (VisionZip, HiPrune) whose official LLaVA-NeXT code merges the
    crops with its own ``spatial`` merge: under ``compat="official"`` it emits no ``image_newline``
    tokens and ranks every crop token, padding included (pass ``vtc.apply(..., unpad=False)`` for its
    padded grid too); under ``compat="clean"`` LLaVA-NeXT's standard rows and unpadding apply."""

    @property
    def newline_policy(self) -> str | None:
        return "none" if self.config.compat == "official" else None

    @property
    def sees_padding(self) -> bool:
        return self.config.compat == "official"
