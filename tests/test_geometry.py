"""vtc.geometry: layouts, partitions from indices, LLaVA-NeXT's unpadded crop cells, pooled layouts."""

from __future__ import annotations

import pytest
import torch
from _geometry_ref import ref_cells, ref_unpad  # tests/ is on sys.path (its conftest)

import vtc
from vtc.errors import LayoutError
from vtc.geometry import (
    AnyResGrid,
    CropRules,
    Layout,
    crop_cells,
    drop_padding,
    partitions,
    pooled_layouts,
    stock_length,
    unpad_bounds,
    unpadded_positions,
)
from vtc.integrations import anyres
from vtc.tokens import VisualTokens


def _anyres_tokens(size=(40, 60), crops=(2, 2), grid=(3, 3), group=True):
    lay = Layout.for_anyres(grid, crops, size)
    n = lay.num_tokens
    t = VisualTokens(x=torch.randn(1, n, 4), layout=lay)
    if group:
        t = t.replace(group=torch.arange(n).unsqueeze(0) // (grid[0] * grid[1]))
    return t, lay


def test_layout_is_the_same_class_everywhere():
    assert vtc.Layout is Layout and vtc.tokens.Layout is Layout


def test_partitions_from_indices_follow_the_layout_offsets():
    lay = Layout(grids=((2, 2), (3, 3), (1, 2)))
    idx = torch.tensor([[0, 3, 4, 12, 14, 13, 5]])
    t = VisualTokens(x=torch.randn(1, 7, 2), index=idx, layout=lay)
    assert partitions(t).tolist() == [[0, 0, 1, 1, 2, 2, 1]]
    assert partitions(t.replace(group=torch.zeros_like(idx))).tolist() == [[0] * 7]


def test_crop_cells_and_drop_padding_brute_force():
    """Every crop cell's place in the crop grid and the unpad, against a loop over the cells."""
    t, lay = _anyres_tokens()
    r0, r1, c0, c1 = unpad_bounds((6, 6), (40, 60))
    assert (r0, r1, c0, c1) == (1, 5, 0, 6)
    cells = crop_cells(t)
    want_inside, want_row, want_col = [], [], []
    for i in range(lay.num_tokens):
        p, local = divmod(i, 9)
        r, c = divmod(local, 3)
        if p == 0:
            want_inside.append(False)
            want_row.append(None)
            want_col.append(None)
            continue
        R, C = (p - 1) // 2 * 3 + r, (p - 1) % 2 * 3 + c
        want_inside.append(r0 <= R < r1 and c0 <= C < c1)
        want_row.append(R)
        want_col.append(C)
    assert cells.inside[0].tolist() == want_inside
    crop = [i for i in range(lay.num_tokens) if i >= 9]
    assert cells.row[0, crop].tolist() == [want_row[i] for i in crop]
    assert cells.col[0, crop].tolist() == [want_col[i] for i in crop]
    # drop_padding keeps the base and the inside cells in order, also when group must be derived
    for grouped in (True, False):
        tt, _ = _anyres_tokens(group=grouped)
        out = drop_padding(tt)
        want = [i for i in range(lay.num_tokens) if i < 9 or want_inside[i]]
        assert out.index[0, : int(out.counts[0])].tolist() == want
        assert out.group is not None


def test_pooling_operators_record_their_pooled_grid():
    t, lay = _anyres_tokens(size=(96, 96), crops=(1, 1), grid=(8, 8))
    pooled = vtc.create("m3", keep=4)(t)
    assert pooled.layouts()[0].pooled == (2, 2) and pooled.layouts()[0].lattice() == (2, 2)
    p = vtc.create("pool", keep=8)(t)  # 4 tokens per partition: a 2x2 grid
    assert p.layouts()[0].pooled == (2, 2)
    # pool:keep=6 on 8x8 partitions: 1x3 windows are not square, the tokens keep the patch lattice
    p = vtc.create("pool", keep=6)(t)
    assert p.layouts()[0].pooled == (1, 3) and p.layouts()[0].lattice() == (8, 8)
    # an image that already fits its budget is not pooled and keeps its layout
    small = VisualTokens(x=torch.randn(2, 16, 3), mask=torch.arange(16).expand(2, 16) < torch.tensor([[16], [4]]),
                         layout=Layout.grid(4))
    out = vtc.create("pool", keep=4)(small)
    assert [lay.pooled for lay in out.layouts()] == [(2, 2), None]
    assert pooled_layouts(VisualTokens(x=torch.randn(1, 4, 2)), [1], [1]) is None


def test_the_assembly_reads_the_pooled_layout_not_the_token_sizes():
    """Pooled tokens lie on the pooled grid because the layout says so; equal sizes alone do not make a lattice."""
    t, lay = _anyres_tokens(size=(60, 60), crops=(1, 2), grid=(4, 4))
    pooled = vtc.create("m3", keep=4)(t)
    out = anyres.assemble(pooled, torch.zeros(4), "unpadded_rows")
    # 3 partitions of 2x2; crop grid 2 x 4 on the lattice, unpadded (60x60 on a 2x4 grid: columns 1..3)
    r0, r1, c0, c1 = unpad_bounds((2, 4), (60, 60))
    assert (r0, r1, c0, c1) == (0, 2, 1, 3)
    assert int(out.counts[0]) == 4 + (r1 - r0) * (c1 - c0 + 1)
    unmarked = pooled.replace(layout=lay)  # same tokens and sizes, layout without the pooled grid
    out2 = anyres.assemble(unmarked, torch.zeros(4), "unpadded_rows")
    n_nl = int((out2.index[0, : int(out2.counts[0])] >= lay.num_tokens).sum())
    assert n_nl == 4  # a newline per unpadded row of the 4 x 8 patch grid, not of the pooled grid


def test_pooled_layout_validation():
    with pytest.raises(LayoutError, match="pooled"):
        Layout.grid(4).pooled_to(0, 2)


# ---------------------------------------------------------------------- unpad arithmetic and crop rules
# LLaVA-NeXT (336-px crops of 24x24 patches) image sizes (height, width) where the arithmetics keep
# different rows or columns, with the crop grid LLaVA-NeXT picks for them; found by a search over
# 100..399 px (9 of 90000 sizes differ in float32, 5 in float64; python eval/geometry_parity.py)
ROUNDING_CASES = [((152, 171), (24, 48)), ((232, 145), (24, 48)), ((342, 304), (48, 24)), ((369, 328), (48, 24)),
                  ((110, 352), (24, 48)), ((176, 110), (24, 48)), ((328, 205), (24, 48)), ((352, 110), (48, 24))]


def test_unpad_roundings_follow_each_implementation():
    for size, grid in ROUNDING_CASES:
        got = {r: unpad_bounds(grid, size, r) for r in ("transformers", "float32", "float64")}
        assert got == {r: ref_unpad(grid, size, r) for r in got}, size
        assert len(set(got.values())) > 1, size  # the rounding matters at this size
    g = torch.Generator().manual_seed(0)
    for _ in range(3000):
        oh, ow = (int(v) for v in torch.randint(1, 2000, (2,), generator=g))
        grid = [(24, 48), (48, 24), (48, 48), (24, 72), (72, 24), (7, 13)][int(torch.randint(0, 6, (1,), generator=g))]
        for r in ("transformers", "float32", "float64"):
            assert unpad_bounds(grid, (oh, ow), r) == ref_unpad(grid, (oh, ow), r), (grid, oh, ow, r)
    with pytest.raises(LayoutError, match="unpad_rounding"):
        unpad_bounds((24, 48), (10, 10), "float16")
    with pytest.raises(LayoutError, match="unpad_rounding"):
        CropRules(rounding="float16")


def test_thin_images_leave_an_empty_unpadded_grid_as_stock():
    assert unpad_bounds((24, 72), (4, 400)) == (12, 12, 0, 72)  # no row
    assert unpad_bounds((72, 24), (400, 4)) == (0, 72, 12, 12)  # no column: each row still gets a newline
    g = AnyResGrid.from_layout(Layout.for_anyres(24, (3, 1), image_size=(400, 4)), "test")
    assert g.valid_size() == (72, 0) and not bool(g.crop_cells()[1].any())
    assert stock_length(Layout.for_anyres(24, (3, 1), image_size=(400, 4))) == 576 + 72


@pytest.mark.parametrize("rules", [CropRules(), CropRules("float32", transposed=True), CropRules("float64", rank_placement=True),
                                   CropRules(transposed=True, rank_placement=True)], ids=str)
@pytest.mark.parametrize("case", [(1, 2, 4, (10, 27)), (2, 1, 4, (30, 9)), (1, 3, 3, (20, 40)), (2, 2, 3, (50, 29)),
                                  (1, 2, 8, (287, 328)), (1, 2, 8, (392, 343))])
def test_crop_cells_follow_the_rules(case, rules):
    nh, nw, side, size = case
    t, lay = _anyres_tokens(size=size, crops=(nh, nw), grid=(side, side))
    want = ref_cells(nh, nw, side, size, rules.rounding, rules.transposed, rules.rank_placement)
    cells = crop_cells(t, rules=rules)
    crop = range(side * side, lay.num_tokens)
    assert [bool(cells.inside[0, i]) for i in crop] == [want[i][0] for i in crop]
    assert [(int(cells.row[0, i]), int(cells.col[0, i])) for i in crop if want[i][0]] == [
        want[i][1] for i in crop if want[i][0]]
    # the operators' dense geometry agrees: the same cells survive, emitted at the same place
    g = AnyResGrid.from_layout(lay, "test", rules)
    pos, inside = g.crop_cells()
    placed = g.placed_cells()
    W = g.width
    for i in crop:
        c, k = divmod(i - side * side, side * side)
        assert bool(inside[c, k]) == want[i][0]
        if want[i][0]:
            assert divmod(int(placed[c, k]), W) == want[i][1]
    # drop_padding and the integration's cached positions keep the same tokens
    dropped = drop_padding(t, rules)
    pos_t, valid, _ = unpadded_positions([lay], rules, t.device)
    assert pos_t[0, valid[0]].tolist() == dropped.index[0, : int(dropped.counts[0])].tolist()


def test_the_geometry_cache_keeps_the_recently_used_within_its_budget(monkeypatch):
    import vtc.geometry as geometry

    monkeypatch.setattr(geometry, "_CACHE", {})
    monkeypatch.setattr(geometry, "_CACHE_BYTES", [0])
    monkeypatch.setattr(geometry, "CACHE_BYTES", 3 * 4000)
    cpu = torch.device("cpu")
    made = []

    def build(i):
        made.append(i)
        return torch.zeros(1000)  # 4000 bytes

    for i in (0, 1, 2, 0, 3):  # 0 is used again before 3 comes: 1 is the least recently used
        geometry.cached(("t", i), cpu, lambda i=i: build(i))
    assert made == [0, 1, 2, 3] and [k[0][1] for k in geometry._CACHE] == [2, 0, 3]
    assert geometry._CACHE_BYTES[0] == 3 * 4000
