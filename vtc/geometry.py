"""Grid geometry of visual tokens: each image's :class:`Layout`, and LLaVA-NeXT's AnyRes rules.

The one place that knows how an image's tokens lie on patch grids. A :class:`Layout` lists the
``(h, w)`` patch grid of each partition of one image; token ``index`` values run over the
partitions' raster positions (``offsets[p] + row*w + col``). LLaVA-NeXT-style AnyRes images are a
base view (partition 0) plus an ``nH x nW`` grid of crops (partitions ``1..nH*nW``, row-major)
that tile an ``(nH*h) x (nW*w)`` crop grid, which the model unpads to the original aspect ratio:
if the image is wider than the grid (``orig_w/orig_h > W/H``) it keeps rows ``[pad, H - pad)``
with ``pad = (H - int(orig_h * W / orig_w)) // 2``, otherwise the same for columns (transformers'
``unpad_image``, rounded to 7 decimals before ``int``). :func:`unpad_bounds` is that rule;
:class:`AnyResGrid` one image's crop geometry; :func:`crop_cells` each token's cell in the crop
grid and whether the unpad keeps it; :func:`drop_padding` removes what the unpad removes;
:func:`stock_length` counts the tokens stock LLaVA-NeXT emits for an image.

Pooling operators (``pool``, ``m3``) record the grid they pooled to in ``Layout.pooled``
(:func:`pooled_layouts`); :meth:`Layout.lattice` is the grid the pooled tokens then tile (the
pooled grid when the windows are square and tile the patch grid exactly, as M3's ``avg_pool2d``),
so the LLaVA-NeXT assembly lays pooled tokens out on that grid without guessing what ran.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vtc.errors import LayoutError

if TYPE_CHECKING:  # tokens.py imports Layout from here
    from vtc.tokens import VisualTokens

__all__ = ["Layout", "unpad_bounds", "AnyResGrid", "CropCells", "crop_cells", "partitions", "drop_padding",
           "stock_length", "pooled_layouts"]


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


def unpad_bounds(grid: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of an ``(H, W)`` crop grid that survive unpadding.

    ``image_size`` is the original ``(height, width)``; the rule is LLaVA-NeXT's ``unpad_image``.
    """
    H, W = (int(v) for v in grid)
    oh, ow = (int(v) for v in image_size)
    if oh <= 0 or ow <= 0:
        raise LayoutError(f"image_size must be a positive (height, width), got {image_size!r}")
    if ow / oh > W / H:
        new_h = int(round(oh * (W / ow), 7))
        pad = (H - new_h) // 2
        return pad, H - pad, 0, W
    new_w = int(round(ow * (H / oh), 7))
    pad = (W - new_w) // 2
    return 0, H, pad, W - pad


def stock_length(layout: Layout) -> int:
    """How many tokens stock LLaVA-NeXT emits for this image (base + unpadded crops + a newline per row)."""
    (h, w) = layout.grids[0]
    if layout.anyres is None:
        return h * w
    nh, nw = layout.anyres
    r0, r1, c0, c1 = unpad_bounds((nh * h, nw * w), layout.image_size)
    return h * w + (r1 - r0) * (c1 - c0 + 1)


@dataclass(frozen=True)
class AnyResGrid:
    """One image's AnyRes geometry: ``nh x nw`` crops of ``h x w`` patches, unpadded area ``rows x cols``."""

    nh: int
    nw: int
    h: int
    w: int
    rows: tuple[int, int]
    cols: tuple[int, int]

    @classmethod
    def from_layout(cls, layout: Layout, op: str) -> AnyResGrid:
        """The geometry of ``layout``'s patch grid; ``op`` names the caller in errors."""
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
        nh, nw = layout.anyres
        h, w = layout.grids[0]
        r0, r1, c0, c1 = unpad_bounds((nh * h, nw * w), layout.image_size)
        if r1 <= r0 or c1 <= c0:
            raise LayoutError(f"{op}: image_size {layout.image_size} leaves no rows or columns after unpadding")
        return cls(nh, nw, h, w, (r0, r1), (c0, c1))

    @property
    def num_crops(self) -> int:
        return self.nh * self.nw

    def crop_cells(self) -> tuple[Tensor, Tensor]:
        """``(grid_pos [C, h*w], inside [C, h*w])``: each crop cell's raster position in the
        ``(nh*h) x (nw*w)`` grid, and whether it survives the unpad."""
        C, h, w = self.num_crops, self.h, self.w
        c = torch.arange(C).view(C, 1)
        t = torch.arange(h * w).view(1, -1)
        gr = (c // self.nw) * h + t // w
        gc = (c % self.nw) * w + t % w
        inside = (gr >= self.rows[0]) & (gr < self.rows[1]) & (gc >= self.cols[0]) & (gc < self.cols[1])
        return gr * (self.nw * w) + gc, inside

    def valid_size(self) -> tuple[int, int]:
        """``(H_valid, W_valid)``: the unpadded grid's size."""
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]


def _anyres_layouts(tokens: VisualTokens, what: str) -> list[Layout]:
    layouts = tokens.layouts()
    if any(lay is None or lay.anyres is None for lay in layouts):
        raise LayoutError(f"{what} needs one AnyRes layout per image (vtc.Layout.for_anyres)")
    return layouts


def partitions(tokens: VisualTokens) -> Tensor:
    """``[B, N]`` long: each token's partition (``group``, or from ``index`` and the layout's offsets)."""
    if tokens.group is not None:
        return tokens.group
    layouts = tokens.layouts()
    if all(lay is None or lay.num_partitions == 1 for lay in layouts):
        return torch.zeros_like(tokens.index)
    P = max(lay.num_partitions for lay in layouts)
    ends = torch.full((tokens.batch_size, P), torch.iinfo(torch.long).max, dtype=torch.long)
    for b, lay in enumerate(layouts):
        acc = torch.tensor(lay.offsets[1:] + (lay.num_tokens,), dtype=torch.long)
        ends[b, :lay.num_partitions] = acc
    ends = ends.to(tokens.device)
    part = torch.searchsorted(ends, tokens.index.contiguous(), right=True).clamp_max(P - 1)
    return torch.where(tokens.valid, part, torch.zeros_like(part))


@dataclass
class CropCells:
    """Where each token of a batch of AnyRes images lies in its image's crop grid (see :func:`crop_cells`).

    ``row``/``col`` ``[B, N]``: the cell in the ``(nH*eh) x (nW*ew)`` crop grid on the lattice
    ``(eh, ew)`` (meaningless for base tokens); ``base``/``crop`` ``[B, N]``: valid base / crop
    tokens; ``inside`` ``[B, N]``: crop tokens inside the kept rectangle. Per image ``[B, 1]``:
    ``nh``, ``nw``, ``eh``, ``ew`` and the kept rectangle ``r0, r1, c0, c1``.
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


def crop_cells(tokens: VisualTokens, unpad: bool = True) -> CropCells:
    """Each token's cell in its image's crop grid on the layout's :meth:`~Layout.lattice`.

    ``tokens`` hold per-image AnyRes partitions (``group`` or indices that say the partition, one
    ``for_anyres`` layout per image). ``unpad=False`` keeps the whole crop grid.
    """
    layouts = _anyres_layouts(tokens, "the LLaVA-NeXT crop geometry")
    if any(len(set(lay.grids)) != 1 for lay in layouts):
        raise LayoutError("the LLaVA-NeXT crop geometry needs every partition of an image to have the same patch grid")
    dev = tokens.device
    meta = []
    for lay in layouts:  # per-image geometry on Python ints
        nh, nw = lay.anyres
        eh, ew = lay.lattice()
        bounds = unpad_bounds((nh * eh, nw * ew), lay.image_size) if unpad else (0, nh * eh, 0, nw * ew)
        meta.append((nh, nw, eh, ew, *bounds))
    m = torch.tensor(meta, dtype=torch.long, device=dev)
    nh, nw, eh, ew, r0, r1, c0, c1 = (m[:, i:i + 1] for i in range(8))
    group = partitions(tokens)
    tokens = tokens if tokens.group is not None else tokens.replace(group=group)
    r, c, h, w = tokens.grid_position()
    valid = tokens.valid
    ci = (group - 1).clamp_min(0)
    row = (ci // nw) * eh + r * eh // h
    col = (ci % nw) * ew + c * ew // w
    crop = valid & (group >= 1)
    inside = crop & (row >= r0) & (row < r1) & (col >= c0) & (col < c1)
    return CropCells(row=row, col=col, base=valid & (group == 0), crop=crop, inside=inside, nh=nh, nw=nw, eh=eh,
                     ew=ew, r0=r0, r1=r1, c0=c0, c1=c1)


def drop_padding(tokens: VisualTokens) -> VisualTokens:
    """The tokens without the crop cells that LLaVA-NeXT's unpadding removes (order kept).

    ``group`` is set from ``index`` if it was missing (a selector splits partitions by ``group``).
    """
    _anyres_layouts(tokens, "drop_padding")
    if tokens.group is None:
        tokens = tokens.replace(group=partitions(tokens))
    cells = crop_cells(tokens)
    keep = cells.base | cells.inside
    if bool((keep | ~tokens.valid).all()):
        return tokens
    return tokens.keep_mask(keep)


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
