"""LLaVA-NeXT AnyRes machinery shared by the high-resolution allocators (``hired``, ``globalcom2``).

An AnyRes image is a base view (partition 0) plus an ``nH x nW`` grid of crops (partitions
``1..nH*nW``, row-major), each an ``h x w`` patch grid; token ``index`` is ``p*h*w + raster``. The
geometry itself (the crop grid, LLaVA-NeXT's unpad rule, which cells survive it) lives in
:mod:`vtc.geometry`. This module turns a batch of tokens into dense ``[B, P, h*w]`` per-partition
maps (scores, positions, which crop cells survive the unpad, each cell's position in the assembled
grid), ranks cells per partition under per-partition budgets, and emits the kept cells in
LLaVA-NeXT's order (base first, then the crop grid row-major). Images in a batch may have
different crop grids and original sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtc.errors import LayoutError, SignalError
from vtc.geometry import STOCK, AnyResGrid, CropRules, cached, cached_columns, cached_table, unpad_bounds  # noqa: F401 - unpad_bounds: the rule
from vtc.ops.selection import descending_order, rank_mask
from vtc.tokens import VisualTokens, checking_structure


@dataclass
class DenseParts:
    """A batch's tokens as dense ``[B, P, h*w]`` per-partition maps (P = most partitions in the batch).

    ``pos``: the token's position in its row (``-1`` where absent); ``exists``: the partition exists
    for that image; ``inside``: the cell survives LLaVA-NeXT's unpad (always true for the base);
    ``grid_pos``: crop cells' raster position in the assembled crop grid; ``place``: where a kept
    crop cell is emitted in that grid (``grid_pos`` unless the rules place by rank, see
    :class:`~vtc.geometry.CropRules`); ``grids``: per-image geometry. The geometry maps are cached
    per batch of layouts (:func:`~vtc.geometry.cached_table`): shared, never modify them in place.
    """

    pos: Tensor
    exists: Tensor
    inside: Tensor
    grid_pos: Tensor
    grids: list[AnyResGrid]
    h: int
    w: int
    #: ``[B, 1]`` long per-image geometry: crop grid ``nh``, ``nw``, the unpadded rows ``[r0, r1)``
    #: and columns ``[c0, c1)`` of the assembled crop grid and its crops per row ``tw`` (for batched arithmetic)
    place: Tensor | None = None
    nh: Tensor | None = None
    nw: Tensor | None = None
    r0: Tensor | None = None
    r1: Tensor | None = None
    c0: Tensor | None = None
    c1: Tensor | None = None
    tw: Tensor | None = None

    @property
    def present(self) -> Tensor:
        return self.pos >= 0

    @property
    def num_parts(self) -> Tensor:
        """``[B]``: partitions per image."""
        return self.exists.sum(1)

    def scatter(self, values: Tensor, fill: float = 0.0) -> Tensor:
        """A per-token ``[B, N]`` tensor as a dense ``[B, P, h*w]`` map (``fill`` where absent)."""
        B = values.shape[0]
        rows = torch.arange(B, device=values.device).view(B, 1, 1)
        out = values[rows, self.pos.clamp_min(0)]
        return out.masked_fill(~self.present, fill)


def is_anyres(tokens: VisualTokens, op: str) -> bool:
    """Whether the batch holds AnyRes images; raises if it mixes them with single-partition images."""
    flags = [lay is not None and lay.num_partitions > 1 for lay in tokens.layouts()]
    if any(flags) and not all(flags):
        raise LayoutError(f"{op}: a batch mixes AnyRes and single-partition images; run them in separate batches")
    if (not flags[0] and tokens.group is not None and checking_structure()
            and bool(((tokens.group > 0) & tokens.valid).any())):
        raise LayoutError(
            f"{op}: tokens come from several partitions but have no AnyRes layout; pass "
            "layout=vtc.Layout.for_anyres(grid, (nH, nW), image_size=(height, width)) per image"
        )
    return flags[0]


def dense_parts(tokens: VisualTokens, op: str, rules: CropRules = STOCK) -> DenseParts:
    """Lay out AnyRes tokens densely (see :class:`DenseParts`) under the crop ``rules``; every image
    needs a ``for_anyres`` layout.

    Raises a :class:`LayoutError` if a token appears twice (merged or duplicated tokens) or if
    the base view or the unpadded area of a crop is incomplete: these allocators must run on the
    vision tower's tokens, before any other operator.
    """
    layouts = tokens.layouts()
    if any(lay is None for lay in layouts):
        raise LayoutError(f"{op}: LLaVA-NeXT tokens need a layout per image (vtc.Layout.for_anyres)")
    grids = [AnyResGrid.from_layout(lay, op, rules) for lay in layouts]
    h, w = grids[0].h, grids[0].w
    if any((g.h, g.w) != (h, w) for g in grids):
        raise LayoutError(f"{op}: every image in the batch must use the same patch grid")
    HW = h * w
    B, N = tokens.x.shape[:2]
    dev = tokens.device
    P = 1 + max(g.num_crops for g in grids)
    key = ("dense-parts", tuple(layouts), rules)
    # per image: partitions, nh, nw, r0, r1, c0, c1, tiles per row; then per cell: inside, grid_pos, place
    parts, nh, nw, r0, r1, c0, c1, tw = cached_columns(
        key, dev, lambda: [[1 + g.num_crops, g.nh, g.nw, *g.rows, *g.cols, g.tiles[1]] for g in grids])
    inside = cached_table(key + ("inside",), dev, lambda: _cell_maps(grids, P, HW)[0], torch.bool)
    grid_pos = cached_table(key + ("grid_pos",), dev, lambda: _cell_maps(grids, P, HW)[1])
    place = cached_table(key + ("place",), dev, lambda: _cell_maps(grids, P, HW)[2])
    part = tokens.index // HW
    local = tokens.index % HW
    valid = tokens.valid
    check = checking_structure()
    if check:
        if tokens.group is not None and bool(((tokens.group != part) & valid).any()):
            raise LayoutError(f"{op}: token group ids disagree with their indices (index = partition*{HW} + raster)")
        if bool((((tokens.index < 0) | (part >= parts)) & valid).any()):
            raise LayoutError(f"{op}: token indices fall outside the layout's {HW}-token partitions")
    slot = torch.where(valid, part * HW + local, torch.full_like(part, P * HW))
    rows = torch.arange(B, device=dev).unsqueeze(1)
    if check:
        hits = torch.zeros(B, P * HW + 1, dtype=torch.long, device=dev)
        hits.index_put_((rows.expand(B, N), slot), torch.ones_like(slot), accumulate=True)
        if bool((hits[:, :-1] > 1).any()):
            raise LayoutError(f"{op}: a patch appears more than once; run {op} on the vision tower's own tokens, "
                              "before any merging operator")
    pos = torch.full((B, P * HW + 1), -1, dtype=torch.long, device=dev)
    pos[rows.expand(B, N), slot] = torch.arange(N, device=dev).expand(B, N)
    pos = pos[:, :-1].view(B, P, HW)
    exists = cached(key + ("exists",), dev, lambda: torch.arange(P, device=dev).unsqueeze(0) < parts)
    if check and bool((exists.unsqueeze(2) & inside & (pos < 0)).any()):
        raise LayoutError(
            f"{op}: some tokens of the base view or of a crop's unpadded area are missing; {op} decides "
            "budgets from complete partitions, so put it first in the pipeline, on the vision tower's tokens"
        )
    return DenseParts(pos=pos, exists=exists, inside=inside, grid_pos=grid_pos, grids=grids, h=h, w=w,
                      place=place, nh=nh, nw=nw, r0=r0, r1=r1, c0=c0, c1=c1, tw=tw)


def _cell_maps(grids: list[AnyResGrid], P: int, HW: int) -> Tensor:
    """``[3, B, P, HW]``: inside (0/1), grid position and emission position of every cell of every
    image's partitions (the base: inside, position 0; partitions an image lacks: not inside)."""
    out = torch.zeros(3, len(grids), P, HW, dtype=torch.long)
    out[0, :, 0] = 1
    for b, g in enumerate(grids):
        pos, inside = g.crop_cells()
        C = g.num_crops
        out[0, b, 1:1 + C] = inside.long()
        out[1, b, 1:1 + C] = pos
        out[2, b, 1:1 + C] = g.placed_cells()
    return out


def dense_signal(tokens: VisualTokens, dense: DenseParts, name: str, layer: int, op: str) -> Tensor:
    """Signal ``name`` at ``layer`` as a float64 ``[B, P, h*w]`` map (0 where absent)."""
    s = tokens.signal(name, layer, op=f"operator {op!r}")
    if s.dim() != 2:
        raise SignalError(f"{op} needs signals[{name!r}][{layer}] of shape [B, N] (one value per token), "
                          f"got {tuple(s.shape)}")
    # NaN/Inf were rejected where the tokens entered (VisualTokens.validate checks required signals)
    return dense.scatter(s.to(torch.float64))


def top_cells(scores: Tensor, allowed: Tensor, k: Tensor) -> Tensor:
    """``[B, P, M]`` bool: the ``k[b, p]`` highest-scoring ``allowed`` cells of each partition
    (ties to the lower raster position, as ``torch.topk``/``argmax`` on distinct values). No host sync."""
    B, P, M = scores.shape
    order = descending_order(scores.reshape(B * P, M), allowed.reshape(B * P, M))
    return (rank_mask(order, k.reshape(-1)) & allowed.reshape(B * P, M)).view(B, P, M)


def at_least_one(budget: Tensor) -> Tensor:
    """``budget`` ``[B, P]`` with the base's budget raised to 1 where an image's budgets are all 0."""
    empty = budget.sum(1) == 0
    return torch.cat([budget[:, :1] + empty.unsqueeze(1).long(), budget[:, 1:]], 1)


def keep_base_top1_if_empty(keep: Tensor, base_scores: Tensor) -> Tensor:
    """``keep`` ``[B, P, M]`` where an image that keeps nothing keeps its base's top cell instead."""
    empty = ~keep.flatten(1).any(1)
    top = descending_order(base_scores)[:, :1]
    first = torch.zeros_like(keep[:, 0]).scatter_(1, top, True) & empty.unsqueeze(1)
    return torch.cat([(keep[:, 0] | first).unsqueeze(1), keep[:, 1:]], 1)


def emit(tokens: VisualTokens, dense: DenseParts, keep: Tensor, base_rank: Tensor) -> VisualTokens:
    """Keep the cells ``keep`` ``[B, P, h*w]``: the base's cells ordered by ``base_rank`` ``[B, h*w]``,
    then every crop's cells in the raster order of the assembled crop grid (LLaVA-NeXT's order).
    One host sync (the output width)."""
    B, P, HW = keep.shape
    key = dense.place + HW
    key = torch.cat([base_rank.unsqueeze(1), key[:, 1:]], 1)
    big = torch.iinfo(torch.long).max
    key = torch.where(keep & dense.present, key, torch.full_like(key, big)).view(B, P * HW)
    order = torch.sort(key, dim=1, stable=True).indices
    n = (key < big).sum(1)
    K, K_min = (torch.stack([n.max(), n.min()]).tolist() if B else (0, 0))
    sel = order[:, :K]
    pos = dense.pos.view(B, P * HW).gather(1, sel)
    if K_min == K:
        return tokens.gather(pos).replace(budget=None)
    valid = torch.arange(K, device=keep.device).unsqueeze(0) < n.unsqueeze(1)
    out = tokens.gather(torch.where(valid, pos, torch.zeros_like(pos)), valid, some_invalid=True)
    return out.replace(budget=None)
