"""Uniform baseline: keep an evenly spaced lattice of the patch grid.

For a partition whose grid ``h x w`` is complete, ``k`` tokens are taken from a ``gh x gw``
lattice with ``gh = ceil(sqrt(k*h/w))``, ``gw = ceil(k/gh)`` whose cells are centred
(``row_i = floor((i + 1/2) * h / gh)``, likewise columns); when the lattice has more than ``k``
points, ``k`` of them are taken evenly spaced in raster order. E.g. 64 of 24x24 is every 3rd row
and column starting at 1. Tokens that no longer form a complete grid (already pruned, or several
partitions in one row without budgets) are subsampled evenly in their current order instead:
position ``floor((i + 1/2) * n / k)``. Output keeps the original order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vtc.errors import LayoutError
from vtc.ops.base import SelectConfig, Selector
from vtc.registry import register
from vtc.tokens import VisualTokens, checking_structure


@dataclass
class UniformConfig(SelectConfig):
    """``keep``/``ratio``: the budget."""


def _ceil_div(a: Tensor, b: Tensor) -> Tensor:
    return -((-a) // b)


def lattice_positions(h: Tensor, w: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Raster positions ``[B, K]`` (and validity) of ``k`` evenly spread cells of ``h x w`` grids."""
    kk = k.clamp_min(1)
    gh = torch.ceil(torch.sqrt(kk.double() * h / w)).long().clamp(1, None)
    gh = torch.minimum(gh, h)
    gw = torch.minimum(_ceil_div(kk, gh), w)
    gh = torch.minimum(torch.maximum(gh, _ceil_div(kk, gw)), h)
    L = gh * gw
    K = int(k.max().item()) if k.numel() else 0
    m = torch.arange(K, device=k.device).unsqueeze(0)
    l = ((2 * m + 1) * L.unsqueeze(1)) // (2 * kk.unsqueeze(1))
    i, j = l // gw.unsqueeze(1), l % gw.unsqueeze(1)
    r = ((2 * i + 1) * h.unsqueeze(1)) // (2 * gh.unsqueeze(1))
    c = ((2 * j + 1) * w.unsqueeze(1)) // (2 * gw.unsqueeze(1))
    return r * w.unsqueeze(1) + c, m < k.unsqueeze(1)


@functools.lru_cache(maxsize=64)
def _host_lattice(h: int, w: int, k: int) -> tuple[int, ...]:
    """:func:`lattice_positions` for one grid and ``k >= 1``, in raster order, in host integers."""
    gh = min(max(math.ceil(math.sqrt(k * h / w)), 1), h)
    gw = min(-(-k // gh), w)
    gh = min(max(gh, -(-k // gw)), h)
    L = gh * gw
    out = []
    for m in range(k):
        i, j = divmod((2 * m + 1) * L // (2 * k), gw)
        out.append(((2 * i + 1) * h // (2 * gh)) * w + (2 * j + 1) * w // (2 * gw))
    return tuple(sorted(out))


_DEVICE_POS: dict[tuple, Tensor] = {}


def _positions(key: tuple, values: Callable[[], tuple[int, ...]], device: torch.device) -> Tensor:
    t = _DEVICE_POS.get((key, device))
    if t is None:
        if len(_DEVICE_POS) > 128:
            _DEVICE_POS.clear()
        t = _DEVICE_POS[(key, device)] = torch.tensor(values(), dtype=torch.long, device=device)
    return t


@register("uniform")
class Uniform(Selector):
    Config = UniformConfig
    default_stage = "vision"
    int_budget = True

    def select(self, tokens: VisualTokens, k: Tensor | int) -> VisualTokens:
        if isinstance(k, int):
            out = self._select_fixed(tokens, k)
            if out is not None:
                return out
            k = torch.full((tokens.batch_size,), k, dtype=torch.long, device=tokens.device)
        B, N = tokens.x.shape[:2]
        dev = tokens.device
        n = tokens.counts
        rows = torch.arange(B, device=dev).unsqueeze(1)
        # 1-D fallback: evenly spaced among the tokens present
        m = torch.arange(N, device=dev).unsqueeze(0)
        pos = ((2 * m + 1) * n.unsqueeze(1)) // (2 * k.clamp_min(1).unsqueeze(1))
        keep = torch.zeros(B, N + 1, dtype=torch.bool, device=dev)
        keep[rows.expand(B, N), torch.where(m < k.unsqueeze(1), pos, torch.full_like(pos, N))] = True
        keep = keep[:, :N]
        try:
            r, c, h, w = tokens.grid_position()
        except LayoutError:
            return tokens.keep_mask(keep)
        valid = tokens.valid
        group = tokens.group if tokens.group is not None else torch.zeros_like(tokens.index)
        g0 = group[:, :1]
        hw = (h * w)[:, 0]
        one_part = ((group == g0) | ~valid).all(1)
        full = one_part & (n == hw)
        if bool(full.any()):
            local = r * w + c
            target, tvalid = lattice_positions(h[:, 0], w[:, 0], k)
            HW = int(hw.max().item())
            table = torch.zeros(B, HW + 1, dtype=torch.bool, device=dev)
            table[rows.expand_as(target), torch.where(tvalid, target, torch.full_like(target, HW))] = True
            grid_keep = table.gather(1, local.clamp(0, HW - 1)) & valid
            keep = torch.where(full.unsqueeze(1), grid_keep, keep)
        return tokens.keep_mask(keep)

    def _select_fixed(self, tokens: VisualTokens, k: int) -> VisualTokens | None:
        """Every image holds all ``N`` tokens and keeps ``k``: the positions follow from host facts
        (no sync), or None when whether the tokens form a complete grid depends on the data."""
        grid = tokens.uniform_grid()
        if grid is None:
            return None
        P, h, w = grid
        N = tokens.num_tokens
        dev = tokens.device
        if N != h * w:  # not one complete grid: evenly spaced in the current order
            return tokens.gather(_positions(("even", N, k), lambda: tuple((2 * i + 1) * N // (2 * k)
                                                                           for i in range(k)), dev)
                                 .expand(tokens.batch_size, k))
        if P != 1:
            return None  # one partition's worth of tokens: complete only if they share a partition
        if checking_structure():
            tokens.check_layout()
        target = _positions(("lattice", h, w, k), lambda: _host_lattice(h, w, k), dev)
        B = tokens.batch_size
        if tokens.raster:
            return tokens.gather(target.expand(B, k))
        # the tokens are a permutation of the grid: find where each lattice cell sits, keep current order
        pos_of = torch.zeros(B, N, dtype=torch.long, device=dev).scatter_(
            1, tokens.index, torch.arange(N, device=dev).expand(B, N))
        return tokens.gather(pos_of[:, target].sort(dim=1).values)
