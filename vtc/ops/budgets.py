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
