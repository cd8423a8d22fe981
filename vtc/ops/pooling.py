"""Grid pooling primitive shared by ``pool`` and ``m3``: average the tokens of each grid cell.

A token at ``(row, col)`` of an ``h x w`` partition grid falls in cell
``(row * gh // h, col * gw // w)`` of a ``gh x gw`` target grid (non-overlapping windows; when
``gh`` divides ``h`` this is ``avg_pool2d`` with kernel = stride = ``h / gh``). Each cell's tokens
merge into one, size-weighted (so pooling merged tokens stays a mean over original patches),
represented by its first token in raster order. Empty cells (their tokens were pruned earlier)
produce no token. Cells are keyed by partition, so every partition pools on its own grid.

Complete grids (every image holds all ``P*h*w`` tokens of ``P`` equal ``h x w`` partitions, no
mask) take a fixed-size path with no host sync: ``avg_pool2d`` when the windows divide the grid
and tokens carry no ``size`` (M3's own operation), else a size-weighted merge whose cells are known
on the host. Other inputs (pruned grids, padding, mixed layouts) take the general path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from vtc.tokens import SIGNAL_MERGE_RULES, VisualTokens, checking_structure, size_dtype


def complete_grid(tokens: VisualTokens) -> tuple[int, int, int] | None:
    """``(P, h, w)`` when ``tokens`` hold every cell of ``P`` equal ``h x w`` partitions in every
    image (no mask, one shared layout, ``group`` set when ``P > 1``), else None. Host facts only."""
    if tokens.mask is not None:
        return None
    grid = tokens.uniform_grid()
    if grid is None:
        return None
    P, h, w = grid
    if tokens.num_tokens != P * h * w or (P > 1 and tokens.group is None):
        return None
    return grid


@functools.lru_cache(maxsize=64)
def _cell_tables(P: int, h: int, w: int, gh: int, gw: int) -> tuple[list[int], list[int]]:
    """Host tables for pooling complete grids: the output slot of each original position
    ``p*h*w + r*w + c`` and each slot's representative (its first, top-left patch)."""
    slot, rep = [], []
    for p in range(P):
        for r in range(h):
            for c in range(w):
                slot.append((p * gh + r * gh // h) * gw + c * gw // w)
        for i in range(gh):
            for j in range(gw):
                rep.append(p * h * w + (-(-i * h // gh)) * w + (-(-j * w // gw)))
    return slot, rep


_DEVICE_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}


def _tables(P: int, h: int, w: int, gh: int, gw: int, device: torch.device) -> tuple[Tensor, Tensor]:
    key = (P, h, w, gh, gw, device)
    t = _DEVICE_TABLES.get(key)
    if t is None:
        if len(_DEVICE_TABLES) > 64:
            _DEVICE_TABLES.clear()
        slot, rep = _cell_tables(P, h, w, gh, gw)
        t = _DEVICE_TABLES[key] = (torch.tensor(slot, device=device), torch.tensor(rep, device=device))
    return t


def pool_complete_grid(tokens: VisualTokens, P: int, h: int, w: int, gh: int, gw: int) -> VisualTokens:
    """Pool complete grids (see :func:`complete_grid`) to ``gh x gw`` per partition: exactly
    ``P*gh*gw`` tokens per image, no host sync."""
    B, N = tokens.x.shape[:2]
    dev = tokens.device
    if checking_structure():
        tokens.check_layout()
    slot_of, rep_index = _tables(P, h, w, gh, gw, dev)
    if h % gh == 0 and w % gw == 0 and tokens.size is None:
        return _avg_pool(tokens, P, h, w, gh, gw, rep_index)
    assign = slot_of[tokens.index]
    rep = rep_index.expand(B, -1) if tokens.raster else _positions_of(tokens.index)[:, rep_index]
    return tokens.merge(assign, rep, complete=True)


def _positions_of(index: Tensor) -> Tensor:
    """``[B, N]``: the position in its row of each original index ``0..N-1`` (``index`` is a
    permutation of them in every row)."""
    B, N = index.shape
    return torch.zeros(B, N, dtype=torch.long, device=index.device).scatter_(
        1, index, torch.arange(N, device=index.device).expand(B, N))


def _avg_pool(tokens: VisualTokens, P: int, h: int, w: int, gh: int, gw: int, rep_index: Tensor) -> VisualTokens:
    B, N = tokens.x.shape[:2]
    kh, kw = h // gh, w // gw
    M = P * gh * gw
    rows = torch.arange(B, device=tokens.device).unsqueeze(1)
    pos_of = None if tokens.raster else _positions_of(tokens.index)

    def pool(t: Tensor, rule: str) -> Tensor:
        tail = t.shape[2:]
        c = t.reshape(B, N, -1)
        C = c.shape[2]
        # to raster order (tokens may be any permutation of the grid), then [B*P, C, h, w] channels-last
        if not tokens.raster:
            c = c[rows, pos_of]
        g = c.view(B * P, h, w, C).permute(0, 3, 1, 2)
        if rule == "mean":
            out = F.avg_pool2d(g, (kh, kw))
        elif rule == "sum":
            out = F.avg_pool2d(g, (kh, kw), divisor_override=1)
        elif rule == "max":
            out = F.max_pool2d(g, (kh, kw))
        else:  # min
            out = -F.max_pool2d(-g, (kh, kw))
        return out.permute(0, 2, 3, 1).reshape(B, M, *tail)

    signals = {name: {l: pool(t, SIGNAL_MERGE_RULES.get(name, "mean")) for l, t in per_layer.items()}
               for name, per_layer in tokens.signals.items()}
    rep = rep_index.expand(B, M)
    return VisualTokens.unchecked(
        x=pool(tokens.x, "mean"),
        index=rep,
        size=torch.full((B, M), float(kh * kw), dtype=size_dtype(tokens.x.dtype), device=tokens.device),
        group=None if tokens.group is None else rep // (h * w),
        layout=tokens.layout,
        signals=signals,
        budget=tokens.budget,
        layer_space=tokens.layer_space,
    )


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
