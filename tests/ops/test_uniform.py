"""Uniform baseline (vtc/ops/uniform.py) against a pure-python re-implementation of its docstring."""

import math

import pytest
import torch
from _ops_testlib import assert_batch_equals_alone, assert_kept_aligned, grid_tokens, partition_budget_check

import vtc
from vtc import Layout, VisualTokens
from vtc.errors import InputError


def ref_lattice(h: int, w: int, k: int) -> list[int]:
    """k cells of an h x w grid: a gh x gw lattice of centred cells (gh = ceil(sqrt(k h / w)),
    gw = ceil(k / gh), both capped by the grid), k of its points evenly spaced in raster order."""
    gh = min(max(math.ceil(math.sqrt(k * h / w)), 1), h)
    gw = min(-(-k // gh), w)
    gh = min(max(gh, -(-k // gw)), h)
    L = gh * gw
    out = []
    for m in range(k):
        l = (2 * m + 1) * L // (2 * k)
        i, j = divmod(l, gw)
        out.append(((2 * i + 1) * h // (2 * gh)) * w + (2 * j + 1) * w // (2 * gw))
    return sorted(out)


def ref_even(n: int, k: int) -> list[int]:
    """k of n positions, evenly spaced: floor((i + 1/2) n / k)."""
    return [(2 * i + 1) * n // (2 * k) for i in range(k)]


def _op(keep=None, **kw):
    return vtc.create("uniform", **kw) if keep is None else vtc.create("uniform", keep=keep, **kw)


@pytest.mark.parametrize("h, w, k", [(24, 24, 64), (24, 24, 144), (24, 24, 50), (24, 24, 1), (12, 24, 32), (5, 7, 34),
                                     (7, 3, 20), (6, 6, 35)])
def test_full_grid_against_reference(h, w, k):
    t = grid_tokens([h * w], h, w, D=2, seed=k, full=True)
    out = _op(k)(t)
    ref = ref_lattice(h, w, k)
    assert len(set(ref)) == k and out.index[0].tolist() == ref
    torch.testing.assert_close(out.x[0], t.x[0, ref], rtol=0, atol=0)


def test_64_of_24x24_is_every_third_row_and_column_from_1():
    out = _op(64)(VisualTokens(x=torch.randn(1, 576, 2)))  # no layout: a square grid is assumed
    rows_cols = {(i // 24, i % 24) for i in out.index[0].tolist()}
    assert rows_cols == {(r, c) for r in range(1, 24, 3) for c in range(1, 24, 3)}


def test_tokens_off_a_complete_grid_are_spaced_evenly_in_order():
    t = grid_tokens([50, 30, 20], 8, D=2, seed=1, size=True, signals={"cls_attn": ([22], None)})
    out = assert_batch_equals_alone(_op(10), t)
    for b in range(3):
        idx = t.index[b, : t.counts[b]].tolist()
        assert out.index[b, : out.counts[b]].tolist() == [idx[p] for p in ref_even(len(idx), 10)]
    assert_kept_aligned(t, out)
    # no layout and a token count that is not a square: also evenly spaced
    out = _op(4)(VisualTokens(x=torch.randn(1, 10, 2)))
    assert out.index[0].tolist() == ref_even(10, 4) == [1, 3, 6, 8]


def test_batch_mixing_full_and_pruned_grids():
    full = grid_tokens([36], 6, D=2, seed=2, full=True)
    part = grid_tokens([20], 6, D=2, seed=3)
    t = VisualTokens.from_list([full.x[0], part.x[0, :20]], index=[full.index[0], part.index[0, :20]],
                               layout=Layout.grid(6))
    out = assert_batch_equals_alone(_op(9), t)
    assert out.index[0].tolist() == ref_lattice(6, 6, 9)
    assert out.index[1].tolist() == [part.index[0, p].item() for p in ref_even(20, 9)]


def test_ratio_and_edges():
    t = grid_tokens([100], 10, D=2, seed=4, full=True)
    assert _op(ratio=0.25)(t).index[0].tolist() == ref_lattice(10, 10, 25)
    assert _op(100)(t) is t and _op(105)(t) is t
    assert _op(1)(t).index[0].tolist() == [55]


def test_per_partition_budgets():
    t = grid_tokens([75, 75], 5, D=2, seed=5, parts=3, full=True, signals={"cls_attn": ([22], None)})
    out = partition_budget_check(_op, t, torch.tensor([[4, 0, 25], [9, 1, 7]]))
    assert (out.index[0, :4] % 25).tolist() == ref_lattice(5, 5, 4)


def test_deterministic_stage_and_errors():
    t = grid_tokens([36], 6, seed=6, full=True)
    assert torch.equal(_op(9)(t).index, _op(9)(t).index) and _op(9).stage == "vision"
    t.x[0, 3, 0] = float("inf")
    with pytest.raises(InputError, match="'uniform'"):
        _op(9)(t)
