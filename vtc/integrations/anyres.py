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
newline tokens (HiRED's official code). Tokens a pooling operator averaged to a regular lattice
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
from vtc.geometry import Layout, crop_cells
from vtc.tokens import VisualTokens

__all__ = ["NEWLINE_POLICIES", "partition_pixels", "group_partitions", "assemble"]

NEWLINE_POLICIES = ("rows", "unpadded_rows", "all_rows", "none")


def partition_pixels(pixel_values: Tensor, parts: Sequence[int], family: str) -> Tensor:
    """The ``[sum(parts), 3, H, W]`` tower inputs of a processor's ``pixel_values``: ``[images, max
    partitions, 3, H, W]`` (padded; image ``i`` uses its first ``parts[i]``) or already 4-D."""
    if pixel_values.dim() == 5:
        dev = pixel_values.device
        counts = torch.tensor(list(parts), device=dev).unsqueeze(1)
        keep = torch.arange(pixel_values.shape[1], device=dev).unsqueeze(0) < counts
        pixel_values = pixel_values[keep]
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
    counts = torch.tensor(list(parts), device=dev)
    start = torch.cumsum(counts, 0) - counts
    p = torch.arange(P, device=dev)
    row = (start.unsqueeze(1) + p).clamp_max(T - 1)  # [B, P] flat row of each (image, partition)
    valid_p = p.unsqueeze(0) < counts.unsqueeze(1)

    def take(t: Tensor) -> Tensor:
        g = t[row]  # [B, P, N, ...]
        if g.is_floating_point():
            g = g.masked_fill(~valid_p.view(B, P, *([1] * (g.dim() - 2))), 0)
        return g.reshape(B, P * N, *t.shape[2:])

    mask = valid_p.repeat_interleave(N, dim=1)
    size = None if flat.size is None else take(flat.size)
    zero = torch.zeros((), dtype=torch.long, device=dev)
    return VisualTokens(
        x=take(flat.x),
        mask=None if bool(mask.all()) else mask,
        # padding gets partition 0 / index 0, which every image's layout has
        index=torch.where(mask, torch.arange(P * N, device=dev), zero),
        size=size,
        group=torch.where(mask, p.repeat_interleave(N), zero),
        layout=tuple(layouts),
        signals={k: {l: take(t) for l, t in v.items()} for k, v in flat.signals.items()},
        layer_space=flat.layer_space,
    )


def assemble(tokens: VisualTokens, newline: Tensor | None, policy: str = "rows", unpad: bool = True) -> VisualTokens:
    """LLaVA-NeXT's sequence for every image in ``tokens`` (see the module docstring).

    ``tokens`` hold per-image partitions (``group``, ``index``, one AnyRes ``layout`` per image);
    ``newline`` is the ``[D]`` ``image_newline`` vector. Returns left-packed VisualTokens in sequence
    order; a newline token has ``index = layout.num_tokens + row`` (beyond every patch index),
    ``size`` 1, zero signals and the ``group`` of the crop that ends its row.
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
    is_cls = tokens.valid & (tokens.index < 0)  # CLS tokens: no cell (geometry reads their partition's first)
    geo = tokens
    if bool(is_cls.any()):
        hw = torch.tensor([lay.grids[0][0] * lay.grids[0][1] for lay in layouts], device=tokens.device).unsqueeze(1)
        part = tokens.group if tokens.group is not None else torch.zeros_like(tokens.index)
        geo = tokens.replace(index=torch.where(is_cls, part * hw, tokens.index))
    cells = crop_cells(geo, unpad)  # each token's cell on the (possibly pooled) crop grid
    group = tokens.group if tokens.group is not None else torch.zeros(B, N, dtype=torch.long, device=dev)
    nH, nW, eh = cells.nh, cells.nw, cells.eh
    R, C, inside = cells.row, cells.col, cells.inside
    r0, r1 = cells.r0, cells.r1
    ntok = torch.tensor([lay.num_tokens for lay in layouts], device=dev).unsqueeze(1)
    Wb = nW * cells.ew  # crop-grid width, per image [B, 1]
    pos = torch.arange(N, device=dev).expand(B, N)
    big = torch.full_like(pos, -1)
    # newline entries, one candidate per big-grid row
    H = int((nH * eh).max().item())
    after_grid = N + H * (Wb + 1) + pos  # beyond every grid and newline key
    tok_key = torch.where(cells.base, pos, torch.where(inside & ~is_cls, N + R * (Wb + 1) + C,
                                                       torch.where(is_cls, after_grid, big)))
    rows = torch.arange(H, device=dev).expand(B, H)
    if policy == "rows":
        has = torch.zeros(B, H + 1, dtype=torch.bool, device=dev)
        has.scatter_(1, torch.where(inside, R, torch.full_like(R, H)).clamp(0, H), True)
        nl_ok = has[:, :H]
    elif policy == "unpadded_rows":
        nl_ok = (rows >= r0) & (rows < r1)
    elif policy == "all_rows":
        nl_ok = rows < nH * eh
    else:
        nl_ok = torch.zeros(B, H, dtype=torch.bool, device=dev)
    nl_key = torch.where(nl_ok, N + rows * (Wb + 1) + Wb, torch.full_like(rows, -1))
    keys = torch.cat([tok_key, nl_key], 1)  # [B, N + H]
    live = keys >= 0
    order = torch.sort(torch.where(live, keys, torch.full_like(keys, torch.iinfo(torch.long).max)), dim=1,
                       stable=True).indices
    n_out = live.sum(1)
    K = int(n_out.max().item()) if B else 0
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
    nl_group = 1 + (nl_row // eh) * nW + (nW - 1)
    return VisualTokens(
        x=pick(tokens.x, nl_x),
        mask=None if bool(out_valid.all()) else out_valid,
        index=torch.where(is_nl, ntok + nl_row, tokens.index[rows_b, tok_pos]),
        size=None if tokens.size is None else pick(tokens.size, 1.0),
        group=torch.where(is_nl, nl_group, group[rows_b, tok_pos]),
        layout=tokens.layout,
        signals={k: {l: pick(t, 0.0) for l, t in v.items()} for k, v in tokens.signals.items()},
        budget=tokens.budget,
        layer_space=tokens.layer_space,
    )
