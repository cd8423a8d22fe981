"""Grid geometry of visual tokens: each image's :class:`Layout`, and LLaVA-NeXT's AnyRes rules.

The one place that knows how an image's tokens lie on patch grids. A :class:`Layout` lists the
``(h, w)`` patch grid of each partition of one image; token ``index`` values run over the
partitions' raster positions (``offsets[p] + row*w + col``). LLaVA-NeXT-style AnyRes images are a
base view (partition 0) plus an ``nH x nW`` grid of crops (partitions ``1..nH*nW``, row-major)
that tile an ``(nH*h) x (nW*w)`` crop grid, which the model unpads to the original aspect ratio:
if the image is wider than the grid (``orig_w/orig_h > W/H``) it keeps rows ``[pad, H - pad)``
with ``pad = (H - int(orig_h * W / orig_w)) // 2``, otherwise the same for columns.
:func:`unpad_bounds` is that rule; :class:`AnyResGrid` one image's crop geometry; :func:`crop_cells`
each token's cell in the crop grid and whether the unpad keeps it; :func:`drop_padding` removes
what the unpad removes; :func:`stock_length` counts the tokens stock LLaVA-NeXT emits for an image.

Implementations of LLaVA-NeXT differ in three details, collected in :class:`CropRules`:

- ``rounding`` of ``int(orig_h * W / orig_w)`` (:data:`UNPAD_ROUNDINGS`): current transformers
  rounds to 7 decimals before ``int`` (``"transformers"``, the default and what the processor counts
  placeholders with), original LLaVA truncates the float64 product (``"float64"``), and the
  transformers 4.40-era code that HiRED's fork runs computes in float32 because ``image_sizes`` is
  a LongTensor (``"float32"``). About 1 in 10^4 image sizes keeps another row or column;
- ``transposed``: transformers before 4.41 unpacked the crop grid shape as ``(width, height)``, so
  the ``nH x nW`` crops (row-major) are tiled on an ``nW x nH`` grid and unpadded there (HiRED's fork;
  square grids are unaffected);
- ``rank_placement``: GlobalCom²'s official code puts each kept crop token at the crop cell whose
  raster number is the token's rank among the crop's unpadded cells, and does not unpad again.

Geometry tables are cached per layout (and per batch of layouts, on each device), so steady-state
calls do no Python loop over images and no host-to-device copy.

Pooling operators (``pool``, ``m3``) record the grid they pooled to in ``Layout.pooled``
(:func:`pooled_layouts`); :meth:`Layout.lattice` is the grid the pooled tokens then tile (the
pooled grid when the windows are square and tile the patch grid exactly, as M3's ``avg_pool2d``),
so the LLaVA-NeXT assembly lays pooled tokens out on that grid without guessing what ran.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vtc.errors import LayoutError

if TYPE_CHECKING:  # tokens.py imports Layout from here
    from vtc.tokens import VisualTokens

__all__ = ["Layout", "UNPAD_ROUNDINGS", "CropRules", "STOCK", "unpad_bounds", "AnyResGrid", "CropCells",
           "crop_cells", "partitions", "drop_padding", "unpadded_positions", "stock_length", "pooled_layouts",
           "cached", "cached_table", "cached_columns", "to_device"]

#: the unpad arithmetics of LLaVA-NeXT implementations (see the module docstring)
UNPAD_ROUNDINGS = ("transformers", "float32", "float64")


@dataclass(frozen=True)
class Layout:
    """Grid facts of one image's tokens.

    ``grids[p]`` is the ``(h, w)`` patch grid of partition ``p``; partition ``p``'s tokens have
    original indices ``offsets[p] .. offsets[p] + h*w - 1`` in raster order. ``anyres`` is
    LLaVA-NeXT's crop grid ``(nH, nW)`` (partition 0 is the base view, crops follow row-major),
    ``image_size`` the original ``(height, width)`` that LLaVA-NeXT's unpadding needs, ``pooled``
    the ``(gh, gw)`` grid a pooling operator averaged every partition to (a token at ``(r, c)``
    then stands for cell ``(r*gh//h, c*gw//w)``; None: not pooled), and ``info`` free-form facts
    an integration wants to hand to its own later steps.
    """

    grids: tuple[tuple[int, int], ...]
    anyres: tuple[int, int] | None = None
    image_size: tuple[int, int] | None = None
    info: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    pooled: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        grids = tuple((int(h), int(w)) for h, w in self.grids)
        if not grids or any(h < 1 or w < 1 for h, w in grids):
            raise LayoutError(f"Layout.grids must be a non-empty list of positive (h, w) pairs, got {self.grids!r}")
        object.__setattr__(self, "grids", grids)
        if self.anyres is not None:
            nh, nw = (int(v) for v in self.anyres)
            object.__setattr__(self, "anyres", (nh, nw))
            if len(grids) != 1 + nh * nw:
                raise LayoutError(
                    f"an AnyRes layout with a {nh}x{nw} crop grid has {1 + nh * nw} partitions "
                    f"(base + crops) but {len(grids)} grids were given"
                )
        if self.pooled is not None:
            gh, gw = (int(v) for v in self.pooled)
            if gh < 1 or gw < 1:
                raise LayoutError(f"Layout.pooled must be a positive (gh, gw) grid, got {self.pooled!r}")
            object.__setattr__(self, "pooled", (gh, gw))

    @classmethod
    def grid(cls, h: int, w: int | None = None) -> Layout:
        """A single partition of ``h x w`` patches (LLaVA-1.5: ``Layout.grid(24)``)."""
        return cls(grids=((h, h if w is None else w),))

    @classmethod
    def square(cls, n: int) -> Layout:
        """A single square partition of ``n`` tokens; raises if ``n`` is not a perfect square."""
        side = math.isqrt(int(n))
        if side * side != n:
            raise LayoutError(
                f"{n} tokens do not form a square grid; pass layout=Layout.grid(h, w) with the real grid"
            )
        return cls.grid(side)

    @classmethod
    def for_anyres(
        cls, grid: int | tuple[int, int], crops: tuple[int, int], image_size: tuple[int, int] | None = None
    ) -> Layout:
        """Base view plus an ``nH x nW`` grid of crops, each with the same patch ``grid``."""
        g = (grid, grid) if isinstance(grid, int) else tuple(grid)
        nh, nw = crops
        size = None if image_size is None else tuple(int(v) for v in image_size)
        return cls(grids=(g,) * (1 + nh * nw), anyres=(nh, nw), image_size=size)

    @property
    def num_partitions(self) -> int:
        return len(self.grids)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for h, w in self.grids:
            out.append(acc)
            acc += h * w
        return tuple(out)

    @property
    def num_tokens(self) -> int:
        return sum(h * w for h, w in self.grids)

    def pooled_to(self, gh: int, gw: int) -> Layout:
        """This layout, recording that every partition was pooled to a ``gh x gw`` grid."""
        return dataclasses.replace(self, pooled=(int(gh), int(gw)))

    def lattice(self) -> tuple[int, int]:
        """The grid a partition's tokens tile: the pooled grid when the pooling windows are square
        and tile the patch grid exactly (kernel = stride = ``h/gh = w/gw``), else the patch grid."""
        h, w = self.grids[0]
        if self.pooled is None:
            return h, w
        gh, gw = self.pooled
        if h % gh == 0 and w % gw == 0 and h // gh == w // gw:
            return gh, gw
        return h, w


@dataclass(frozen=True)
class CropRules:
    """How one LLaVA-NeXT implementation lays an image's crops out (see the module docstring).

    ``rounding``: one of :data:`UNPAD_ROUNDINGS`; ``transposed``: the crops are tiled on an
    ``nW x nH`` grid (HiRED's fork); ``rank_placement``: a kept crop token goes to the cell numbered
    by its rank among its crop's unpadded cells (GlobalCom²'s official scatter). :data:`STOCK` is
    current transformers' LLaVA-NeXT.
    """

    rounding: str = "transformers"
    transposed: bool = False
    rank_placement: bool = False

    def __post_init__(self) -> None:
        if self.rounding not in UNPAD_ROUNDINGS:
            raise LayoutError(f"unpad_rounding must be one of {UNPAD_ROUNDINGS}, got {self.rounding!r}")

    def tiles(self, nh: int, nw: int) -> tuple[int, int]:
        """``(rows, cols)`` of crops in the assembled grid."""
        return (nw, nh) if self.transposed else (nh, nw)


#: current transformers' LLaVA-NeXT (and the processor's placeholder count)
STOCK = CropRules()


def _f32(v: float) -> float:
    """``v`` rounded to float32 (a float32 division/product of float32 values is the exact result,
    computed in float64, rounded once: float64 has more than 2*24+2 bits)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _unpadded_side(other: int, cur: int, side: int, rounding: str) -> int:
    """``int(other * (cur / side))``, the unpadded height (or width), in ``rounding``'s arithmetic."""
    if rounding == "transformers":
        return int(round(other * (cur / side), 7))
    if rounding == "float64":
        return int(other * (cur / side))
    # the fork: ``side`` and ``other`` are int64 tensors, so ``cur / side`` is torch's
    # ``side.reciprocal() * cur`` in float32, and the product is float32 too
    scale = _f32(_f32(1.0 / _f32(side)) * _f32(cur))
    return int(_f32(_f32(other) * scale))


def unpad_bounds(grid: tuple[int, int], image_size: tuple[int, int],
                 rounding: str = "transformers") -> tuple[int, int, int, int]:
    """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of an ``(H, W)`` crop grid that survive unpadding.

    ``image_size`` is the original ``(height, width)``; the rule is LLaVA-NeXT's ``unpad_image``
    in the arithmetic ``rounding`` names (:data:`UNPAD_ROUNDINGS`). A very thin image can leave no
    row (or column): ``r0 == r1``, as stock does.
    """
    H, W = (int(v) for v in grid)
    oh, ow = (int(v) for v in image_size)
    return _unpad_bounds(H, W, oh, ow, rounding)


@functools.lru_cache(maxsize=8192)
def _unpad_bounds(H: int, W: int, oh: int, ow: int, rounding: str) -> tuple[int, int, int, int]:
    if oh <= 0 or ow <= 0:
        raise LayoutError(f"image_size must be a positive (height, width), got {(oh, ow)!r}")
    if rounding not in UNPAD_ROUNDINGS:
        raise LayoutError(f"unpad_rounding must be one of {UNPAD_ROUNDINGS}, got {rounding!r}")
    if rounding == "float32":  # float32 aspect ratios; the grid's ratio is a Python float cast to float32
        wider = _f32(_f32(ow) / _f32(oh)) > _f32(W / H)
    else:
        wider = ow / oh > W / H
    if wider:
        pad = (H - _unpadded_side(oh, W, ow, rounding)) // 2
        return pad, H - pad, 0, W
    pad = (W - _unpadded_side(ow, H, oh, rounding)) // 2
    return 0, H, pad, W - pad


def stock_length(layout: Layout) -> int:
    """How many tokens stock LLaVA-NeXT emits for this image (base + unpadded crops + a newline per row),
    i.e. the placeholders the transformers processor puts in ``input_ids`` for it."""
    (h, w) = layout.grids[0]
    if layout.anyres is None:
        return h * w
    nh, nw = layout.anyres
    r0, r1, c0, c1 = unpad_bounds((nh * h, nw * w), layout.image_size)
    return h * w + (r1 - r0) * (c1 - c0 + 1)


@dataclass(frozen=True)
class AnyResGrid:
    """One image's AnyRes geometry: ``nh x nw`` crops of ``h x w`` patches tiled as ``tiles``
    (``(nh, nw)``, or ``(nw, nh)`` under :attr:`CropRules.transposed`) on the assembled grid, whose
    unpadded area is ``rows x cols``; ``rank_placement`` as in :class:`CropRules`."""

    nh: int
    nw: int
    h: int
    w: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    tiles: tuple[int, int] | None = None
    rank_placement: bool = False

    def __post_init__(self) -> None:
        if self.tiles is None:
            object.__setattr__(self, "tiles", (self.nh, self.nw))

    @classmethod
    def from_layout(cls, layout: Layout, op: str, rules: CropRules = STOCK,
                    lattice: tuple[int, int] | None = None) -> AnyResGrid:
        """The geometry of ``layout``'s patch grid (or of ``lattice``, the grid its tokens tile) under
        ``rules``; ``op`` names the caller in errors."""
        if layout.anyres is None:
            raise LayoutError(
                f"{op}: several partitions but no AnyRes crop grid; pass "
                "layout=vtc.Layout.for_anyres(grid, (nH, nW), image_size=(height, width)) per image"
            )
        if len(set(layout.grids)) != 1:
            raise LayoutError(f"{op}: every AnyRes partition must have the same patch grid, got {layout.grids}")
        if layout.image_size is None:
            raise LayoutError(
                f"{op}: LLaVA-NeXT unpadding needs the original image size; pass "
                "vtc.Layout.for_anyres(grid, (nH, nW), image_size=(height, width))"
            )
        return _grid(layout, rules, lattice)

    @property
    def num_crops(self) -> int:
        return self.nh * self.nw

    @property
    def width(self) -> int:
        """Columns of the assembled crop grid."""
        return self.tiles[1] * self.w

    def crop_cells(self) -> tuple[Tensor, Tensor]:
        """``(grid_pos [C, h*w], inside [C, h*w])``: each crop cell's raster position in the
        assembled grid, and whether it survives the unpad."""
        return self._cells()[:2]

    def placed_cells(self) -> Tensor:
        """``[C, h*w]``: the raster position in the assembled grid where a kept token of each crop
        cell is emitted (its own cell, or under ``rank_placement`` the cell numbered by its rank
        among its crop's unpadded cells; meaningless for cells the unpad removes)."""
        return self._cells()[2]

    def _cells(self) -> tuple[Tensor, Tensor, Tensor]:
        C, h, w = self.num_crops, self.h, self.w
        tw = self.tiles[1]
        c = torch.arange(C).view(C, 1)
        t = torch.arange(h * w).view(1, -1)
        tr, tc = c // tw, c % tw
        gr, gc = tr * h + t // w, tc * w + t % w
        (r0, r1), (c0, c1) = self.rows, self.cols
        inside = (gr >= r0) & (gr < r1) & (gc >= c0) & (gc < c1)
        pos = gr * self.width + gc
        if not self.rank_placement:
            return pos, inside, pos
        rank = _crop_rank(t // w, t % w, tr * h, tc * w, h, w, self.rows, self.cols)
        placed = (tr * h + rank // w) * self.width + tc * w + rank % w
        return pos, inside, torch.where(inside, placed, pos)

    def valid_size(self) -> tuple[int, int]:
        """``(H_valid, W_valid)``: the unpadded grid's size."""
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]


def _crop_rank(lr: Tensor, lc: Tensor, top: Tensor, left: Tensor, h: Any, w: Any, rows: Any, cols: Any) -> Tensor:
    """Rank of local cell ``(lr, lc)`` of the ``h x w`` crop whose top-left corner in the assembled
    grid is ``(top, left)`` among the crop's cells inside the unpadded ``rows x cols``, in raster
    order (meaningful for cells inside). Broadcastable tensors; ``h``, ``w``, the bounds may be ints."""
    (r0, _), (c0, c1) = rows, cols
    lr0 = (r0 - top).clamp_min(0).clamp_max(h)
    lc0, lc1 = (c0 - left).clamp_min(0).clamp_max(w), (c1 - left).clamp_min(0).clamp_max(w)
    return (lr - lr0) * (lc1 - lc0) + (lc - lc0)


@functools.lru_cache(maxsize=4096)
def _grid(layout: Layout, rules: CropRules, lattice: tuple[int, int] | None) -> AnyResGrid:
    nh, nw = layout.anyres
    h, w = layout.grids[0] if lattice is None else lattice
    th, tw = rules.tiles(nh, nw)
    r0, r1, c0, c1 = unpad_bounds((th * h, tw * w), layout.image_size, rules.rounding)
    return AnyResGrid(nh, nw, h, w, (r0, r1), (c0, c1), (th, tw), rules.rank_placement)


def _anyres_layouts(tokens: VisualTokens, what: str) -> list[Layout]:
    layouts = tokens.layouts()
    if any(lay is None or lay.anyres is None for lay in layouts):
        raise LayoutError(f"{what} needs one AnyRes layout per image (vtc.Layout.for_anyres)")
    return layouts


_CACHE: dict[Any, tuple[Any, int]] = {}
_CACHE_BYTES = [0]
#: what the geometry cache may hold: entries and bytes of device memory (least recently used go first)
CACHE_ENTRIES, CACHE_BYTES = 512, 64 << 20


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def cached(key: Any, device: torch.device, build: Callable[[], Any]) -> Any:
    """``build()`` (tensors on ``device``) computed once per ``(key, device)`` and kept (least recently
    used first out, within :data:`CACHE_ENTRIES` and :data:`CACHE_BYTES`), so geometry tables cost no
    Python loop over images, no host-to-device copy and no op after the first call. What it returns
    is shared: never modify it in place."""
    full = (key, device)
    hit = _CACHE.pop(full, None)
    if hit is None:
        with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable under autograd later
            value = build()
        hit = (value, _nbytes(value))
        _CACHE_BYTES[0] += hit[1]
        while _CACHE and (len(_CACHE) >= CACHE_ENTRIES or _CACHE_BYTES[0] > CACHE_BYTES):
            _CACHE_BYTES[0] -= _CACHE.pop(next(iter(_CACHE)))[1]
    _CACHE[full] = hit
    return hit[0]


def cached_table(key: Any, device: torch.device, build: Callable[[], Any], dtype: torch.dtype = torch.long) -> Tensor:
    """:func:`cached` for a table built on the host (nested lists or a CPU tensor) as ``dtype`` on ``device``."""
    return cached((key, "table", dtype), device, lambda: to_device(torch.as_tensor(build(), dtype=dtype), device))


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host-built table on ``device`` without waiting for the device (an asynchronous copy)."""
    return t if t.device == device else t.to(device, non_blocking=True)


def cached_columns(key: Any, device: torch.device, build: Callable[[], Any]) -> tuple[Tensor, ...]:
    """The columns of a cached ``[B, k]`` long table (see :func:`cached_table`) as ``[B, 1]`` views."""
    def columns() -> tuple[Tensor, ...]:
        t = cached_table(key, device, build)
        return tuple(t[:, i:i + 1] for i in range(t.shape[1]))

    return cached((key, "columns"), device, columns)


def partitions(tokens: VisualTokens) -> Tensor:
    """``[B, N]`` long: each token's partition (``group``, or from ``index`` and the layout's offsets)."""
    if tokens.group is not None:
        return tokens.group
    layouts = tokens.layouts()
    if all(lay is None or lay.num_partitions == 1 for lay in layouts):
        return torch.zeros_like(tokens.index)
    P = max(lay.num_partitions for lay in layouts)
    big = torch.iinfo(torch.long).max

    def ends_rows() -> list[list[int]]:
        rows = []
        for lay in layouts:
            acc = [*lay.offsets[1:], lay.num_tokens]
            rows.append(acc + [big] * (P - len(acc)))
        return rows

    ends = cached_table(("partition-ends", tuple(layouts)), tokens.device, ends_rows)
    part = torch.searchsorted(ends, tokens.index.contiguous(), right=True).clamp_max(P - 1)
    return torch.where(tokens.valid, part, torch.zeros_like(part))


@dataclass
class CropCells:
    """Where each token of a batch of AnyRes images lies in its image's crop grid (see :func:`crop_cells`).

    ``row``/``col`` ``[B, N]``: the cell in the assembled ``(th*eh) x (tw*ew)`` crop grid on the
    lattice ``(eh, ew)`` where the token is emitted (its own cell unless ``rank_placement``;
    meaningless for base tokens); ``base``/``crop`` ``[B, N]``: valid base / crop tokens;
    ``inside`` ``[B, N]``: crop tokens whose own cell is inside the kept rectangle. Per image
    ``[B, 1]``: ``nh``, ``nw`` (crop grid), ``th``, ``tw`` (crops per row/column of the assembled
    grid), ``eh``, ``ew`` and the kept rectangle ``r0, r1, c0, c1``.
    """

    row: Tensor
    col: Tensor
    base: Tensor
    crop: Tensor
    inside: Tensor
    nh: Tensor
    nw: Tensor
    eh: Tensor
    ew: Tensor
    r0: Tensor
    r1: Tensor
    c0: Tensor
    c1: Tensor
    th: Tensor | None = None
    tw: Tensor | None = None


def crop_cells(tokens: VisualTokens, unpad: bool = True, rules: CropRules = STOCK) -> CropCells:
    """Each token's cell in its image's crop grid on the layout's :meth:`~Layout.lattice`, under ``rules``.

    ``tokens`` hold per-image AnyRes partitions (one ``for_anyres`` layout per image; a token's
    partition and cell follow from its ``index``). ``unpad=False`` keeps the whole crop grid. Every
    original index's cell is looked up in a table cached per batch of layouts.
    """
    layouts = _anyres_layouts(tokens, "the LLaVA-NeXT crop geometry")
    if any(len(set(lay.grids)) != 1 for lay in layouts):
        raise LayoutError("the LLaVA-NeXT crop geometry needs every partition of an image to have the same patch grid")
    key = ("crop-cells", tuple(layouts), rules, unpad)
    grids = [_grid(lay, rules, lay.lattice()) for lay in layouts]

    def meta_rows() -> list[list[int]]:
        rows = []
        for g in grids:  # per-image geometry on Python ints
            th, tw = g.tiles
            bounds = (*g.rows, *g.cols) if unpad else (0, th * g.h, 0, tw * g.w)
            rows.append([g.nh, g.nw, th, tw, g.h, g.w, *bounds])
        return rows

    nh, nw, th, tw, eh, ew, r0, r1, c0, c1 = cached_columns(key, tokens.device, meta_rows)
    table = cached(key + ("cells",), tokens.device, lambda: to_device(_cell_table(layouts, grids, unpad), tokens.device))
    rows = torch.arange(tokens.batch_size, device=tokens.device).unsqueeze(1)
    cell = table[:, rows, tokens.index.clamp(0, table.shape[2] - 1)]  # [3, B, N]: row, col, kind
    valid = tokens.valid
    kind = cell[2]
    return CropCells(row=cell[0], col=cell[1], base=valid & (kind == 0), crop=valid & (kind > 0),
                     inside=valid & (kind == 1), nh=nh, nw=nw, eh=eh, ew=ew, r0=r0, r1=r1, c0=c0, c1=c1, th=th, tw=tw)


def _cell_table(layouts: Sequence[Layout], grids: Sequence[AnyResGrid], unpad: bool) -> Tensor:
    """``[3, B, M]`` long over every original token index of each image: the cell ``(row, col)`` on
    the lattice where the token is emitted, and its kind (0: base view, 1: crop cell the unpad keeps,
    2: crop cell it removes)."""
    M = max(lay.num_tokens for lay in layouts)
    out = torch.zeros(3, len(layouts), M, dtype=torch.long)
    for b, (lay, g) in enumerate(zip(layouts, grids)):
        (h, w), n = lay.grids[0], lay.num_tokens
        hw = h * w
        i = torch.arange(hw, n)
        ci, t = i // hw - 1, i % hw
        tw = g.tiles[1]
        tr, tc = ci // tw, ci % tw
        lr, lc = (t // w) * g.h // h, (t % w) * g.w // w
        row, col = tr * g.h + lr, tc * g.w + lc
        rows, cols = (g.rows, g.cols) if unpad else ((0, g.tiles[0] * g.h), (0, tw * g.w))
        inside = (row >= rows[0]) & (row < rows[1]) & (col >= cols[0]) & (col < cols[1])
        if g.rank_placement:
            rank = _crop_rank(lr, lc, tr * g.h, tc * g.w, g.h, g.w, rows, cols)
            row = torch.where(inside, tr * g.h + rank // g.w, row)
            col = torch.where(inside, tc * g.w + rank % g.w, col)
        out[0, b, hw:n], out[1, b, hw:n] = row, col
        out[2, b, hw:n] = torch.where(inside, 1, 2)
    return out


def drop_padding(tokens: VisualTokens, rules: CropRules = STOCK) -> VisualTokens:
    """The tokens without the crop cells that LLaVA-NeXT's unpadding (under ``rules``) removes (order kept).

    ``group`` is set from ``index`` if it was missing (a selector splits partitions by ``group``).
    """
    _anyres_layouts(tokens, "drop_padding")
    if tokens.group is None:
        tokens = tokens.replace(group=partitions(tokens))
    cells = crop_cells(tokens, rules=rules)
    keep = cells.base | cells.inside
    if bool((keep | ~tokens.valid).all()):
        return tokens
    return tokens.keep_mask(keep)


def unpadded_positions(layouts: Sequence[Layout], rules: CropRules, device: torch.device) -> tuple[Tensor, Tensor, bool]:
    """For a batch whose row ``b`` holds image ``b``'s partitions one after another in raster order
    (position ``p*h*w + t``, as the LLaVA-NeXT integration lays the tower's tokens out), the positions
    of the tokens the unpad under ``rules`` keeps, base first, in order: ``(positions [B, K], valid
    [B, K], some_invalid)``. Cached per batch of layouts: what :func:`drop_padding` keeps, with no
    host sync and no data-dependent shape."""
    key = ("unpadded", tuple(layouts), rules)

    def build() -> tuple[Tensor, Tensor, bool]:
        rows = []
        for lay in layouts:
            g = AnyResGrid.from_layout(lay, "the LLaVA-NeXT unpad", rules)
            hw = g.h * g.w
            _, inside = g.crop_cells()
            crop = (torch.arange(g.num_crops * hw).view(g.num_crops, hw) + hw)[inside]
            rows.append(torch.cat([torch.arange(hw), crop]))
        K = max(len(r) for r in rows)
        pos = torch.zeros(len(rows), K, dtype=torch.long)
        valid = torch.zeros(len(rows), K, dtype=torch.bool)
        for b, r in enumerate(rows):
            pos[b, :len(r)] = r
            valid[b, :len(r)] = True
        return to_device(pos, device), to_device(valid, device), not bool(valid.all())

    return cached(key, device, build)


def pooled_layouts(tokens: VisualTokens, gh: Tensor | Sequence[int], gw: Tensor | Sequence[int],
                   rows: Tensor | Sequence[bool] | None = None) -> Any:
    """``tokens.layout`` recording that image ``b``'s partitions were pooled to ``gh[b] x gw[b]``.

    ``rows`` ``[B]`` bool: the images that were pooled (default: all); the others keep their
    layout. A batch without layouts stays without (None).
    """
    if tokens.layout is None:
        return None
    hs = gh.tolist() if isinstance(gh, Tensor) else list(gh)
    ws = gw.tolist() if isinstance(gw, Tensor) else list(gw)
    done = [True] * len(hs) if rows is None else (rows.tolist() if isinstance(rows, Tensor) else list(rows))
    return tuple(lay.pooled_to(h, w) if d else lay for lay, h, w, d in zip(tokens.layouts(), hs, ws, done))
