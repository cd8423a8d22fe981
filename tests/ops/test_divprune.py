"""DivPrune (vtc/ops/divprune.py) against a brute-force fp64 re-implementation of methods.md §1."""

import numpy as np
import pytest
import torch
from _ops_testlib import (
    assert_batch_equals_alone,
    assert_kept_aligned,
    grid_tokens,
    np64,
    partition_budget_check,
)

import vtc
from vtc import VisualTokens
from vtc.errors import InputError
from vtc.ops.divprune import divprune_order


def ref_divprune(x: np.ndarray, k: int) -> list[int]:
    """methods.md §1 as written: D = 1 - cos; first pick = argmax of each column's 2nd-smallest entry;
    then argmax over j of min over selected rows r of D[r, j] (first index on ties). Pick order."""
    N = x.shape[0]
    xn = x / np.sqrt((x * x).sum(1, keepdims=True))
    D = 1.0 - xn @ xn.T
    nearest = [sorted(D[:, j])[1] if N > 1 else np.inf for j in range(N)]
    picks = [int(np.argmax(nearest))]
    for _ in range(1, k):
        mind = [min(D[r, j] for r in picks) for j in range(N)]
        picks.append(int(np.argmax(mind)))
    return picks


def _op(keep=None, **kw):
    return vtc.create("divprune", **kw) if keep is None else vtc.create("divprune", keep=keep, **kw)


@pytest.mark.parametrize("seed, N, D, k", [(0, 40, 8, 1), (1, 40, 8, 7), (2, 64, 16, 20), (3, 25, 3, 24)])
def test_exact_sequence_against_reference(seed, N, D, k):
    x = torch.randn(1, N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    picks = ref_divprune(np64(x[0]), k)
    assert len(set(picks)) == k
    assert divprune_order(x, torch.ones(1, N, dtype=torch.bool), k)[0].tolist() == picks
    out = _op(k)(VisualTokens(x=x))
    assert out.index[0].tolist() == sorted(picks)  # emitted in raster order
    torch.testing.assert_close(out.x[0], x[0, sorted(picks)], rtol=0, atol=0)


def test_pick_sequence_on_original_index():
    """Kept tokens are reported by their original index, not their current position."""
    t = grid_tokens([30], 8, D=5, seed=4)
    picks = ref_divprune(np64(t.x[0]), 6)
    out = _op(6)(t)
    assert out.index[0].tolist() == t.index[0, sorted(picks)].tolist()


@pytest.mark.parametrize("N, ratio", [(100, 0.098), (576, 0.098), (5, 0.5), (7, 0.5), (10, 1.0), (3, 0.1)])
def test_ratio_rounds_like_python(N, ratio):
    x = torch.randn(1, N, 4, dtype=torch.float64)
    k = max(1, round(ratio * N))
    assert _op(ratio=ratio)(VisualTokens(x=x)).counts.tolist() == [k]


def test_batch_of_three_with_variable_counts_equals_each_alone():
    t = grid_tokens([40, 17, 64], 8, D=8, seed=5, signals={"cls_attn": ([22], None)}, size=True)
    out = assert_batch_equals_alone(_op(20), t)
    assert out.counts.tolist() == [20, 17, 20]
    for b in range(3):
        n = int(t.counts[b])
        picks = ref_divprune(np64(t.x[b, :n]), min(20, n))
        assert out.index[b, : out.counts[b]].tolist() == t.index[b, sorted(picks)].tolist()


def test_fields_and_signals_stay_aligned():
    t = grid_tokens([30, 50], 8, D=6, seed=6, parts=1, size=True,
                    signals={"cls_attn": ([16, 22], None), "keys": ([22], 4)})
    out = _op(9)(t)
    assert out.counts.tolist() == [9, 9]
    assert_kept_aligned(t, out)


def test_deterministic():
    t = grid_tokens([50, 33], 8, seed=7)
    a, b = _op(12)(t), _op(12)(t)
    assert torch.equal(a.index, b.index) and torch.equal(a.x, b.x)


def test_edge_budgets():
    t = grid_tokens([30], 6, D=5, seed=8)
    one = _op(1)(t)
    assert one.index[0].tolist() == [int(t.index[0, ref_divprune(np64(t.x[0]), 1)[0]])]
    assert _op(30)(t) is t  # keep == N: nothing to do
    assert _op(35)(t) is t  # keep > N: a no-op


def test_per_partition_budgets():
    t = grid_tokens([40, 30], 5, D=6, seed=9, parts=3, signals={"cls_attn": ([22], None)})
    budget = torch.tensor([[4, 0, 9], [1, 30, 2]])
    out = partition_budget_check(_op, t, budget)
    assert out.counts.tolist() == [13, 3 + int((t.group[1, : t.counts[1]] == 1).sum())]


def test_duplicates_are_never_picked_twice():
    base = torch.randn(3, 4, dtype=torch.float64)
    x = base.repeat(4, 1).unsqueeze(0)  # 12 tokens, 3 distinct vectors
    out = _op(5)(VisualTokens(x=x))
    assert out.counts.tolist() == [5] and len(set(out.index[0].tolist())) == 5


def official_divprune(x: torch.Tensor, k: int) -> list[int]:
    """The official code's order of operations on one image ``[N, D]``, in ``x``'s own dtype:
    ``Xn = X / X.norm``, ``D = 1 - Xn @ Xn.T``, first pick = argmax of each column's 2nd-smallest
    entry (``topk(2, largest=False)`` along the column), then argmax of the min over the picked rows."""
    xn = x / x.norm(dim=1, keepdim=True)
    d = 1 - xn @ xn.T
    picks = [int(d.topk(2, dim=0, largest=False).values[1].argmax())]
    for _ in range(1, k):
        picks.append(int(d[picks].min(dim=0).values.argmax()))
    return picks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_the_official_order_of_operations(dtype):
    """Scored in the input's own dtype as the official fp16 run does (an fp32 upcast picks otherwise)."""
    g = torch.Generator().manual_seed(11)
    differs = 0
    for B, N, D, k in ((3, 64, 32, 20), (2, 120, 16, 40), (1, 300, 64, 56)):
        # a shared component, as projector outputs have: cosines near 1, where rounding decides picks
        x = (0.3 * torch.randn(B, N, D, generator=g) + torch.randn(B, 1, D, generator=g)).to(dtype)
        out = _op(k)(VisualTokens(x=x))
        assert out.x.dtype == dtype
        for b in range(B):
            want = official_divprune(x[b], k)
            assert len(set(want)) == k
            assert out.index[b].tolist() == sorted(want)
            differs += sorted(want) != sorted(official_divprune(x[b].float(), k))
    assert differs > 0  # the precision matters: scoring these tokens in float32 keeps other ones


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_raise(bad):
    x = torch.randn(2, 10, 4)
    x[1, 3, 2] = bad
    with pytest.raises(InputError, match="'divprune'.*NaN/Inf"):
        _op(3)(VisualTokens(x=x))


def test_stage_and_requires():
    assert _op(3).stage == "llm" and _op(3).requires == {}
    assert _op(3, stage="vision").stage == "vision"
