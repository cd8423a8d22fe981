"""AnyRes geometry (vtc/ops/anyres.py) and budget apportionment (vtc/ops/budgets.py)."""

import random

import torch
from _ops_testlib import CLIP_L

import vtc
from vtc import Layout, VisualTokens
from vtc.ops.anyres import AnyResGrid, unpad_bounds
from vtc.ops.budgets import apportion


def exact_unpad(H, W, oh, ow):
    """methods.md §0 in exact integer arithmetic."""
    if ow * H > W * oh:
        pad = (H - (oh * W) // ow) // 2
        return pad, H - pad, 0, W
    pad = (W - (ow * H) // oh) // 2
    return 0, H, pad, W - pad


def test_unpad_bounds_follow_llava_next():
    for H, W in [(24, 48), (48, 24), (48, 48), (24, 72), (72, 24), (16, 16)]:
        for oh in range(10, 420, 7):
            for ow in range(10, 420, 11):
                assert unpad_bounds((H, W), (oh, ow)) == exact_unpad(H, W, oh, ow), (H, W, oh, ow)
    # a 300x500 photo on a 2x2 grid of 24x24 keeps rows 10..37 (28 of 48)
    assert unpad_bounds((48, 48), (300, 500)) == (10, 38, 0, 48)


def test_crop_cells_tile_the_grid_row_major():
    g = AnyResGrid.from_layout(Layout.for_anyres(3, (2, 2), image_size=(40, 60)), "test")
    assert (g.rows, g.cols) == ((1, 5), (0, 6))
    pos, inside = g.crop_cells()
    assert pos[0].tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14]
    assert pos[1].tolist() == [3, 4, 5, 9, 10, 11, 15, 16, 17]
    assert pos[3, 0].item() == 3 * 6 + 3
    assert inside[0].tolist() == [False] * 3 + [True] * 6
    assert inside[3].tolist() == [True] * 6 + [False] * 3
    assert sorted(pos.flatten().tolist()) == list(range(36))


def ref_apportion(w, total, cap):
    C = len(w)
    out, left = [0] * C, min(total, sum(cap))
    while left > 0:
        open_ = [c for c in range(C) if out[c] < cap[c]]
        ww = {c: w[c] for c in open_}
        if sum(ww.values()) == 0:
            ww = {c: 1 for c in open_}
        W = sum(ww.values())
        give = {c: ww[c] * left // W for c in open_}
        for c in sorted(open_, key=lambda c: (-(ww[c] * left % W), c))[:left - sum(give.values())]:
            give[c] += 1
        for c in open_:
            g = min(give[c], cap[c] - out[c])
            out[c] += g
            left -= g
    return out


def test_apportion_is_largest_remainder_with_capacity():
    rng = random.Random(0)
    rows_w, rows_t, rows_c, want = [], [], [], []
    for _ in range(200):
        C = 4
        w = [rng.choice([0, 0, 1, 3, 7, 20]) for _ in range(C)]
        cap = [rng.choice([0, 5, 24, 64]) for _ in range(C)]
        total = rng.randint(0, 150)
        rows_w.append(w)
        rows_t.append(total)
        rows_c.append(cap)
        want.append(ref_apportion(w, total, cap))
    got = apportion(torch.tensor(rows_w), torch.tensor(rows_t), torch.tensor(rows_c))
    assert got.tolist() == want
    assert (got <= torch.tensor(rows_c)).all()
    assert got.sum(1).tolist() == [min(t, sum(c)) for t, c in zip(rows_t, rows_c)]
    # the textbook case: 10 seats for weights 5:3:2 with 1 over -> 5, 3, 2; 7 seats -> 4, 2, 1
    assert apportion(torch.tensor([[5, 3, 2]]), torch.tensor([7]), torch.tensor([[9, 9, 9]])).tolist() == [[4, 2, 1]]


def test_allocators_set_missing_groups_for_the_selector():
    """Tokens without ``group`` (the partition is in ``index``): the selector still fills each partition."""
    P, N = 5, 64
    g = torch.Generator().manual_seed(0)
    tok = VisualTokens(x=torch.randn(1, P * N, 4, generator=g), layout=Layout.for_anyres(8, (2, 2), image_size=(80, 80)),
                       signals={"cls_attn": {l: torch.rand(1, P * N, generator=g) for l in (0, 22)},
                                "cls_logits": {23: torch.randn(1, P * N, generator=g)}}, layer_space=CLIP_L)
    for spec in ("hired:ratio=0.3", "globalcom2"):
        pipe = vtc.build(f"{spec} | random")
        budget = pipe[0].allocate(tok).budget[0].tolist()
        out = pipe(tok)
        assert torch.bincount(out.index[0] // N, minlength=P).tolist() == budget
