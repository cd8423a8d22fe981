"""LLaVA-NeXT's AnyRes sequence: regroup tower rows per image, and assemble the kept tokens.

LLaVA-NeXT encodes an image as ``P = 1 + nH*nW`` partitions of ``h x w`` patches: the base view
(partition 0) and the crops of the padded high-resolution image in row-major order. In vtc one
image's tokens are the concatenation of its partitions (``index = p*h*w + raster position``,
``group = p``, ``layout = Layout.for_anyres(...)``; :func:`group_partitions`). :func:`assemble`
turns the kept tokens back into the sequence the language model reads: the base tokens first, in
the order the operators left them, then the crop tokens placed in the crop grid, cut to the
unpadded rectangle, flattened row-major with ``image_newline`` tokens. The grid rules (crop grid,
unpadding, pooled lattices) are :mod:`vtc.geometry`'s.

Newline policies (``newline=``): ``"rows"`` one newline after each unpadded grid row that still
holds a token (LLaVA-NeXT's standard; identical to stock when nothing is pruned),
``"unpadded_rows"`` after every unpadded row, empty or not, ``"all_rows"`` after every one of the
``nH*h`` rows including rows removed by unpadding (GlobalCom²'s official code), ``"none"`` no
newline tokens (HiRED's official code). An image so thin that the unpad leaves rows without a
column (a 4x400 photo) gets a newline on each of those rows, as stock emits them. The crop grid is
laid out, unpadded and its tokens placed under the pipeline's :class:`~vtc.geometry.CropRules`
(``rules=``; stock transformers' by default). Tokens a pooling operator averaged to a regular lattice
(``Layout.pooled``, e.g. M3's ``avg_pool2d`` with kernel ``s``) are laid out on the pooled
``h/s x w/s`` grid, its unpadding and its newlines, as LLaVA-NeXT-M3 assembles. A crop's CLS
token (``index`` -1, handed to VisionZip official: :mod:`vtc.integrations.cls_token`) has no cell:
the crops' CLS tokens come after the crop grid and its newlines, in crop order, as VisionZip's
official LLaVA-NeXT code appends them. Pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vtc.errors import ConfigError, InputError, LayoutError
from vtc.geometry import STOCK, AnyResGrid, CropRules, Layout, cached, cached_table, crop_cells, to_device
from vtc.tokens import VisualTokens

__all__ = ["NEWLINE_POLICIES", "partition_pixels", "group_partitions", "assemble"]

NEWLINE_POLICIES = ("rows", "unpadded_rows", "all_rows", "none")


def partition_pixels(pixel_values: Tensor, parts: Sequence[int], family: str) -> Tensor:
    """The ``[sum(parts), 3, H, W]`` tower inputs of a processor's ``pixel_values``: ``[images, max
    partitions, 3, H, W]`` (padded; image ``i`` uses its first ``parts[i]``) or already 4-D. The rows
    are taken by a table cached per ``parts`` (no boolean indexing, no host sync)."""
    if pixel_values.dim() == 5:
        most = pixel_values.shape[1]
        if any(p > most for p in parts) or pixel_values.shape[0] != len(parts):
            raise InputError(f"pixel_values hold {pixel_values.shape[0]} images of {most} crops but the images need "
                             f"{list(parts)}")
        rows = cached_table(("pixel-rows", tuple(parts), most), pixel_values.device,
                            lambda: [i * most + p for i, n in enumerate(parts) for p in range(n)])
        pixel_values = pixel_values.flatten(0, 1)[rows]
    elif pixel_values.dim() != 4:
        raise InputError(f"{family} pixel_values must be 4- or 5-dimensional, got {tuple(pixel_values.shape)}")
    if pixel_values.shape[0] != sum(parts):
        raise InputError(f"pixel_values hold {pixel_values.shape[0]} crops but the images need {sum(parts)}")
    return pixel_values


def group_partitions(flat: VisualTokens, parts: Sequence[int], layouts: Sequence[Layout]) -> VisualTokens:
    """Regroup per-partition rows ``[T, N]`` (image after image) into one row per image ``[B, Pmax*N]``.

    Token ``n`` of partition ``p`` gets ``index = p*N + n`` and ``group = p``; images with fewer
    partitions are padded (``mask``). Signals are regrouped alike.
    """
    T, N = flat.x.shape[:2]
    if sum(parts) != T:
        raise LayoutError(f"{T} partition rows do not add up to the images' partitions {list(parts)}")
    if flat.mask is not None:
        raise LayoutError("group_partitions takes complete partitions (no mask)")
    dev = flat.device
    B, P = len(parts), max(parts)
    full = len(set(parts)) == 1  # every image has every partition: no padding

    def tables() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        counts = torch.tensor(list(parts))
        start = torch.cumsum(counts, 0) - counts
        p = torch.arange(P)
        row = (start.unsqueeze(1) + p).clamp_max(T - 1)  # [B, P] flat row of each (image, partition)
        valid_p = p.unsqueeze(0) < counts.unsqueeze(1)
        mask = valid_p.repeat_interleave(N, dim=1)
        # padding gets partition 0 / index 0, which every image's layout has
        index = torch.where(mask, torch.arange(P * N), 0)
        group = torch.where(mask, p.repeat_interleave(N), 0)
        return tuple(to_device(t, dev) for t in (row, valid_p, mask, index, group))

    row, valid_p, mask, index, group = cached(("partitions", tuple(parts), T, N), dev, tables)

    def take(t: Tensor) -> Tensor:
        g = t[row]  # [B, P, N, ...]
        if g.is_floating_point() and not full:
            g = g.masked_fill(~valid_p.view(B, P, *([1] * (g.dim() - 2))), 0)
        return g.reshape(B, P * N, *t.shape[2:])

    return VisualTokens(
        x=take(flat.x),
        mask=None if full else mask,
        index=index,
        size=None if flat.size is None else take(flat.size),
        group=group,
        layout=tuple(layouts),
        signals={k: {l: take(t) for l, t in v.items()} for k, v in flat.signals.items()},
        layer_space=flat.layer_space,
    )


def assemble(tokens: VisualTokens, newline: Tensor | None, policy: str = "rows", unpad: bool = True,
             rules: CropRules = STOCK, exact: bool = True, cls: bool | None = None) -> VisualTokens:
    """LLaVA-NeXT's sequence for every image in ``tokens`` (see the module docstring).

    ``tokens`` hold per-image partitions (``group``, ``index``, one AnyRes ``layout`` per image);
    ``newline`` is the ``[D]`` ``image_newline`` vector; ``rules`` the crop rules. Returns
    left-packed VisualTokens in sequence order; a newline token has ``index = layout.num_tokens +
    row`` (beyond every patch index), ``size`` 1, zero signals and the ``group`` of the crop that
    ends its row. ``exact``: as wide as the longest image (no mask when all are equal; one host
    sync); ``exact=False``: a width known on the host and always a mask, no host sync (for the end
    of a pipeline, where the compaction reads the counts anyway). ``cls``: whether the tokens may
    hold CLS tokens (None: find out, a host sync).
    """
    if policy not in NEWLINE_POLICIES:
        raise ConfigError(f"newline policy must be one of {NEWLINE_POLICIES}, got {policy!r}")
    layouts = tokens.layouts()
    if any(lay is None or lay.anyres is None for lay in layouts):
        raise LayoutError("assemble needs one AnyRes layout per image (vtc.Layout.for_anyres)")
    if any(len(set(lay.grids)) != 1 for lay in layouts):
        raise LayoutError("assemble needs every partition of an image to have the same patch grid")
    if policy != "none" and newline is None:
        raise LayoutError(f"newline policy {policy!r} needs the model's image_newline vector")
    B, N = tokens.x.shape[:2]
    dev = tokens.device
    # CLS tokens (index -1, VisionZip official) have no cell: the base's stays with the base tokens,
    # the crops' come after the grid
    is_cls = tokens.valid & (tokens.index < 0) if cls or cls is None else None
    if cls is None and not bool(is_cls.any()):
        is_cls = None
    cells = crop_cells(tokens, unpad, rules)  # each token's cell on the (possibly pooled) crop grid
    group = tokens.group if tokens.group is not None else torch.zeros(B, N, dtype=torch.long, device=dev)
    tw, eh = cells.tw, cells.eh
    R, C, inside = cells.row, cells.col, cells.inside
    r0, r1 = cells.r0, cells.r1
    H, most = _newline_rows(layouts, rules, unpad, policy)  # grid rows, most newlines of an image (host)
    ntok = cached_table(("num-tokens", tuple(layouts)), dev, lambda: [[lay.num_tokens] for lay in layouts])
    Wb = tw * cells.ew  # crop-grid width, per image [B, 1]
    pos = torch.arange(N, device=dev).expand(B, N)
    big = torch.full_like(pos, -1)
    tok_key = torch.where(cells.base, pos, torch.where(inside, N + R * (Wb + 1) + C, big))
    if is_cls is not None:
        after_grid = N + H * (Wb + 1) + pos  # beyond every grid and newline key
        base = (cells.base & ~is_cls) | (is_cls & (group == 0))
        tok_key = torch.where(base, pos, torch.where(inside & ~is_cls, N + R * (Wb + 1) + C,
                                                     torch.where(is_cls, after_grid, big)))
    # newline entries, one candidate per big-grid row
    rows = torch.arange(H, device=dev).expand(B, H)
    unpadded = (rows >= r0) & (rows < r1)
    if policy == "rows":  # rows holding a token; every unpadded row when the unpad left no column (as stock)
        has = torch.zeros(B, H + 1, dtype=torch.bool, device=dev)
        has.scatter_(1, torch.where(inside, R, torch.full_like(R, H)).clamp(0, H), True)
        nl_ok = has[:, :H] | (unpadded & (cells.c1 == cells.c0))
    elif policy == "unpadded_rows":
        nl_ok = unpadded
    elif policy == "all_rows":
        nl_ok = rows < cells.th * eh
    else:
        nl_ok = torch.zeros(B, H, dtype=torch.bool, device=dev)
    nl_key = torch.where(nl_ok, N + rows * (Wb + 1) + Wb, torch.full_like(rows, -1))
    keys = torch.cat([tok_key, nl_key], 1)  # [B, N + H]
    live = keys >= 0
    order = torch.sort(torch.where(live, keys, torch.full_like(keys, torch.iinfo(torch.long).max)), dim=1,
                       stable=True).indices
    n_out = live.sum(1)
    if not B:
        K = K_min = 0
    elif exact:
        K, K_min = torch.stack([n_out.max(), n_out.min()]).tolist()
    else:
        K, K_min = min(N + most, N + H), -1
    order = order[:, :K]
    out_valid = torch.arange(K, device=dev).unsqueeze(0) < n_out.unsqueeze(1)
    is_nl = order >= N
    tok_pos = order.clamp_max(N - 1)
    nl_row = (order - N).clamp(0, max(H - 1, 0))
    rows_b = torch.arange(B, device=dev).unsqueeze(1)

    def pick(t: Tensor, nl_value: Tensor | float) -> Tensor:
        g = t[rows_b, tok_pos]
        shape = (B, K, *([1] * (g.dim() - 2)))
        nl = nl_value if isinstance(nl_value, Tensor) else torch.full_like(g, nl_value)
        g = torch.where(is_nl.view(shape), nl, g)
        if g.is_floating_point():
            g = g.masked_fill(~out_valid.view(shape), 0)
        return g

    nl_x = newline.to(tokens.x.dtype).to(dev).expand(B, K, -1) if newline is not None else 0.0
    nl_group = 1 + (nl_row // eh) * tw + (tw - 1)
    return VisualTokens.unchecked(
        x=pick(tokens.x, nl_x),
        mask=None if K_min == K else out_valid,
        index=torch.where(is_nl, ntok + nl_row, tokens.index[rows_b, tok_pos]),
        size=None if tokens.size is None else pick(tokens.size, 1.0),
        group=torch.where(is_nl, nl_group, group[rows_b, tok_pos]),
        layout=tokens.layout,
        signals={k: {l: pick(t, 0.0) for l, t in v.items()} for k, v in tokens.signals.items()},
        budget=tokens.budget,
        layer_space=tokens.layer_space,
    )


def _newline_rows(layouts: Sequence[Layout], rules: CropRules, unpad: bool, policy: str) -> tuple[int, int]:
    """``(rows of the tallest assembled crop grid, most newline tokens an image can get)`` on the host."""
    H, most = 0, 0
    for lay in layouts:
        g = AnyResGrid.from_layout(lay, "assemble", rules, lay.lattice())
        rows = g.tiles[0] * g.h
        unpadded = g.rows[1] - g.rows[0] if unpad else rows
        H = max(H, rows)
        most = max(most, {"rows": unpadded, "unpadded_rows": unpadded, "all_rows": rows, "none": 0}[policy])
    return H, most
