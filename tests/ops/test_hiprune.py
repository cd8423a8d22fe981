"""HiPrune (vtc/ops/hiprune.py) against a brute-force re-implementation of its published rule."""

import pytest
import torch
from _ops_testlib import CLIP_L, assert_batch_equals_alone, assert_kept_aligned, grid_tokens, top_k_positions

import vtc
from vtc import Layout

SIG = {"attn_received": ([8, 22], None)}


def ref_hiprune(index, obj, deep, k, h, w, alpha=0.1, official=True, offset=0):
    """Kept original indices (sorted) of one partition whose present tokens have ``index``."""
    index = [int(i) for i in index]
    n = len(index)
    n_anchor = min(round(k * alpha / 5), k // 5)
    anchors = top_k_positions(obj, n_anchor)
    where = {v: i for i, v in enumerate(index)}
    chosen = set(anchors)
    for a in anchors:
        t = index[a] - offset
        r, c = divmod(t, w)
        if official:
            cand = [min(max(t + d, 0), h * w - 1) for d in (-1, 1, -w, w)]
        else:
            cand = [rr * w + cc for rr, cc in ((r, c - 1), (r, c + 1), (r - 1, c), (r + 1, c))
                    if 0 <= rr < h and 0 <= cc < w]
        chosen |= {where[offset + v] for v in cand if offset + v in where}
    rest = k - len(chosen)
    if official:
        lowered = [float(deep[i]) - (1.0 if i in chosen else 0.0) for i in range(n)]
        reg = top_k_positions(lowered, max(rest, 0))
    else:
        free = [i for i in range(n) if i not in chosen]
        reg = [free[j] for j in top_k_positions([float(deep[i]) for i in free], max(rest, 0))]
    return sorted(index[i] for i in chosen | set(reg))


@pytest.mark.parametrize("compat", ["official", "clean"])
def test_matches_reference_on_a_batch_with_a_wide_grid(compat):
    h, w = 5, 7
    t = grid_tokens([35, 28, 35], h, w, D=3, seed=2, signals=SIG, full=False)
    for k, alpha in ((12, 0.5), (20, 1.0), (6, 0.1)):
        op = vtc.create("hiprune", keep=k, alpha=alpha, compat=compat)
        out = assert_batch_equals_alone(op, t)
        assert_kept_aligned(t, out)
        for b in range(3):
            n = int(t.counts[b])
            want = ref_hiprune(t.index[b, :n], t.signals["attn_received"][8][b, :n],
                               t.signals["attn_received"][22][b, :n], min(k, n), h, w, alpha, compat == "official")
            assert out.index[b, :int(out.counts[b])].tolist() == want


def test_official_buffers_wrap_rows_and_clean_ones_do_not():
    h, w = 4, 6
    t = grid_tokens([24], h, w, D=2, seed=0, signals=SIG, full=True)
    obj = torch.zeros(1, 24, dtype=torch.float64)
    obj[0, 11] = 1.0  # the anchor: the last cell of row 1
    deep = torch.linspace(0, 0.5, 24, dtype=torch.float64).flip(0).unsqueeze(0)  # registers: the first cells
    t = t.replace(signals={"attn_received": {8: obj, 22: deep}})
    kw = dict(keep=6, alpha=0.84)  # round(6 * 0.84 / 5) = 1 anchor
    off = vtc.create("hiprune", **kw)(t).index[0].tolist()
    cln = vtc.create("hiprune", compat="clean", **kw)(t).index[0].tolist()
    assert off == [0, 5, 10, 11, 12, 17]  # 12 = 11 + 1 is the next row's first cell; register 0
    assert cln == [0, 1, 5, 10, 11, 17]  # no wrap: two registers instead


def test_per_partition_budgets_on_anyres():
    t = grid_tokens([48, 40], 4, D=2, seed=5, parts=3, signals=SIG)
    t = t.replace(layout=Layout.for_anyres(4, (1, 2), image_size=(4, 8)))
    out = vtc.create("hiprune", keep=14, alpha=0.5)(t)  # official: int(14 / 3) = 4 per partition
    for b in range(2):
        n = int(t.counts[b])
        idx, grp = t.index[b, :n], t.group[b, :n]
        got = out.index[b, :int(out.counts[b])].tolist()
        want = []
        for p in range(3):
            sel = grp == p
            want += ref_hiprune(idx[sel], t.signals["attn_received"][8][b, :n][sel],
                                t.signals["attn_received"][22][b, :n][sel], min(4, int(sel.sum())), 4, 4, 0.5,
                                offset=16 * p)
        assert got == want


def test_requires_and_defaults():
    op = vtc.create("hiprune", keep=64)
    assert op.requires == {"attn_received": ["1/3", "feature"]}
    assert CLIP_L.resolve_all(op.requires["attn_received"]) == [8, 22]  # the official layers on LLaVA-1.5's CLIP-L
    assert [int(v) for v in op.anchors(torch.tensor([192, 128, 64]))] == [4, 3, 1]
    # LLaVA-NeXT: the official code's spatial merge (no newline tokens, padding ranked); clean is standard
    assert (op.newline_policy, op.sees_padding) == ("none", True)
    clean = vtc.create("hiprune", keep=64, compat="clean")
    assert (clean.newline_policy, clean.sees_padding) == (None, False)
