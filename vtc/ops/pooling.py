"""Grid pooling primitive shared by ``pool`` and ``m3``: average the tokens of each grid cell.

A token at ``(row, col)`` of an ``h x w`` partition grid falls in cell
``(row * gh // h, col * gw // w)`` of a ``gh x gw`` target grid (non-overlapping windows; when
``gh`` divides ``h`` this is ``avg_pool2d`` with kernel = stride = ``h / gh``). Each cell's tokens
merge into one, size-weighted (so pooling merged tokens stays a mean over original patches),
represented by its first token in raster order. Empty cells (their tokens were pruned earlier)
produce no token. Cells are keyed by partition, so every partition pools on its own grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtc.tokens import VisualTokens


def pool_to_grid(tokens: VisualTokens, gh: Tensor, gw: Tensor) -> VisualTokens:
    """Pool every partition of every image to a ``gh[b] x gw[b]`` grid (``[B]`` long each)."""
    B, N = tokens.x.shape[:2]
    dev = tokens.device
    r, c, h, w = tokens.grid_position()
    gh_, gw_ = gh.view(B, 1), gw.view(B, 1)
    cell = (r * gh_ // h) * gw_ + (c * gw_ // w)
    group = tokens.group if tokens.group is not None else torch.zeros_like(cell)
    cells_per_part = int((gh * gw).max().item())
    key = group * cells_per_part + cell  # [B, N]; distinct per (partition, cell)
    valid = tokens.valid
    S = int(key[valid].max().item()) + 1 if bool(valid.any()) else 1
    key = torch.where(valid, key, torch.full_like(key, S))
    occupied = torch.zeros(B, S + 1, dtype=torch.bool, device=dev)
    occupied.scatter_(1, key, True)
    occupied = occupied[:, :S]
    slot_of_key = torch.cumsum(occupied.long(), 1) - 1  # compact: rank among occupied cells
    n_slots = occupied.sum(1)
    M = int(n_slots.max().item())
    assign = torch.where(valid, slot_of_key.gather(1, key.clamp_max(S - 1)), torch.full_like(key, -1))
    # representative: first (lowest position) member of each slot; positions follow raster order
    pos = torch.arange(N, device=dev).expand(B, N)
    rep = torch.full((B, M + 1), N, dtype=torch.long, device=dev)
    rep.scatter_reduce_(1, torch.where(assign >= 0, assign, torch.full_like(assign, M)), pos,
                        reduce="amin", include_self=True)
    rep = rep[:, :M]
    slot_valid = torch.arange(M, device=dev).unsqueeze(0) < n_slots.unsqueeze(1)
    return tokens.merge(assign, torch.where(slot_valid, rep, torch.zeros_like(rep)),
                        None if bool(slot_valid.all()) else slot_valid)
