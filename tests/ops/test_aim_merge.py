"""aim_merge (vtc/ops/aim.py) against a brute-force re-implementation of AIM's iterative merging."""

import math

import numpy as np
import pytest
import torch
from _ops_testlib import CLIP_L, assert_batch_equals_alone, grid_tokens, np64

import vtc


def ref_step(tok, r, weighted):
    """Even positions are sources (A), odd ones destinations (B); the r A tokens with the best cosine match
    merge into their best B; AIM: a destination becomes the plain mean of itself and its sources."""
    A, B = tok[0::2], tok[1::2]

    def unit(v):
        return v / math.sqrt(float(v @ v))

    S = [[float(unit(a["m"]) @ unit(b["m"])) for b in B] for a in A]
    best = [max(row) for row in S]
    dst = [row.index(max(row)) for row in S]
    order = sorted(range(len(A)), key=lambda i: (-best[i], i))
    src, unm = order[:r], order[r:]
    out = [dict(A[i]) for i in unm]
    for j, b in enumerate(B):
        members = [b] + [A[i] for i in src if dst[i] == j]
        w = [m["size"] if weighted else 1.0 for m in members]
        out.append({"x": sum(wi * m["x"] for wi, m in zip(w, members)) / sum(w),
                    "m": sum(wi * m["m"] for wi, m in zip(w, members)) / sum(w),
                    "size": sum(m["size"] for m in members), "index": b["index"],
                    "first": min(m["first"] for m in members)})
    return out


def _tokens(t, b):
    n = int(t.counts[b])
    return [{"x": np64(t.x[b, i]), "m": np64(t.signals["keys"][23][b, i]), "size": float(t.sizes[b, i]),
             "index": int(t.index[b, i]), "first": int(t.index[b, i])} for i in range(n)]


def _check(out, b, want):
    n = int(out.counts[b])
    assert out.index[b, :n].tolist() == [w["index"] for w in want]
    torch.testing.assert_close(out.x[b, :n], torch.tensor(np.array([w["x"] for w in want])), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.sizes[b, :n], torch.tensor([w["size"] for w in want], dtype=torch.float64), rtol=0, atol=1e-12)


def test_official_schedule_matches_reference():
    t = grid_tokens([64, 48, 37], 8, D=5, seed=1, size=True, signals={"keys": ([23], 4)})
    op = vtc.create("aim_merge")
    out = assert_batch_equals_alone(op, t, atol=1e-12)
    for b in range(3):
        tok = _tokens(t, b)
        n = len(tok)
        for r in (n // 2, n // 16):  # AIM's r = 288, 36 of 576
            tok = ref_step(tok, min(r, len(tok) // 2), weighted=False)
        _check(out, b, tok)
    assert out.counts.tolist() == [64 - 32 - 4, 48 - 24 - 3, 37 - 18 - 2]


def test_clean_keep_is_size_weighted_and_in_raster_order():
    t = grid_tokens([40, 33], 7, D=4, seed=3, size=True, signals={"keys": ([23], 4)})
    out = vtc.create("aim_merge", keep=9, compat="clean")(t)
    for b in range(2):
        tok = _tokens(t, b)
        while len(tok) > 9:
            tok = ref_step(tok, min(len(tok) - 9, len(tok) // 2), weighted=True)
        tok = [dict(w, index=w["first"]) for w in sorted(tok, key=lambda w: w["first"])]
        _check(out, b, tok)


def test_explicit_r_and_feature_metric():
    t = grid_tokens([30], 6, D=4, seed=2, signals={"keys": ([23], 4)})
    out = vtc.create("aim_merge", r=[10, 5], metric="x")(t)
    tok = [dict(w, m=w["x"]) for w in _tokens(t, 0)]
    for r in (10, 5):
        tok = ref_step(tok, r, weighted=False)
    _check(out, 0, tok)
    assert vtc.create("aim_merge", metric="x").requires == {} and vtc.create("aim_merge").requires == {"keys": ["last"]}
    assert CLIP_L.resolve_all(["last"]) == [23]  # AIM's layer-23 keys on LLaVA-1.5's CLIP-L
    with pytest.raises(vtc.VtcError):
        vtc.create("aim_merge", r=[4], keep=3)


def test_allocator_budgets_are_met_without_keep_or_ratio():
    """Per-partition budgets (an allocator's) bound the output even when aim_merge has no keep=/ratio=
    of its own: AIM's schedule stops at the budget, then merging goes on until it is met (it used to
    run the schedule alone: a 3-token partition with budget 1 kept 2)."""
    t = grid_tokens([5, 17], 3, D=4, seed=0, parts=2, signals={"keys": ([23], 4)})
    budget = torch.tensor([[1, 0], [2, 5]])
    out = vtc.create("aim_merge")(t.replace(budget=budget))
    for b in range(2):
        n = int(out.counts[b])
        for p in range(2):
            got = int((out.group[b, :n] == p).sum())
            present = int((t.group[b, : int(t.counts[b])] == p).sum())
            assert got == min(int(budget[b, p]), present)
