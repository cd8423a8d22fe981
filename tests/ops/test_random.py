"""Random baseline (vtc/ops/random.py) against a pure-python re-implementation of its seeded hash."""

from collections import Counter

import pytest
import torch
from _ops_testlib import (
    assert_batch_equals_alone,
    assert_kept_aligned,
    grid_tokens,
    partition_budget_check,
    top_k_positions,
)

import vtc
from vtc import VisualTokens
from vtc.errors import InputError

M32 = 0xFFFFFFFF


def ref_score(index: int, seed: int) -> float:
    """The module's 32-bit integer hash of (seed, original index), in python integers."""
    h = (index + (seed & M32) * 0x9E3779B) & M32
    for _ in range(2):
        h = (((h >> 16) ^ h) * 0x45D9F3B) & M32
    h = (h >> 16) ^ h
    return h / 2.0**32


def ref_random(index: list[int], k: int, seed: int) -> list[int]:
    """Positions of the k highest hash scores, in their original order."""
    return sorted(top_k_positions([ref_score(i, seed) for i in index], k))


def _op(keep=None, **kw):
    return vtc.create("random", **kw) if keep is None else vtc.create("random", keep=keep, **kw)


@pytest.mark.parametrize("seed, N, k", [(0, 576, 64), (1, 100, 1), (12345, 50, 49), (-7, 30, 10), (2**40 + 3, 40, 5)])
def test_exact_sequence_against_reference(seed, N, k):
    t = VisualTokens(x=torch.randn(1, N, 2))
    out = _op(k, seed=seed)(t)
    assert out.index[0].tolist() == ref_random(list(range(N)), k, seed)


def test_scores_follow_the_original_index():
    t = grid_tokens([40, 25, 60], 8, D=3, seed=1, size=True, signals={"cls_attn": ([22], None)})
    out = assert_batch_equals_alone(_op(12, seed=3), t)
    for b in range(3):
        idx = t.index[b, : t.counts[b]].tolist()
        assert out.index[b, : out.counts[b]].tolist() == [idx[p] for p in ref_random(idx, min(12, len(idx)), 3)]
    assert_kept_aligned(t, out)


def test_same_positions_give_the_same_choice():
    t = VisualTokens(x=torch.randn(2, 64, 3))
    out = _op(16)(t)
    assert torch.equal(out.index[0], out.index[1])


def test_seed_changes_the_choice_and_is_reproducible():
    t = VisualTokens(x=torch.randn(1, 64, 3))
    picks = {tuple(_op(8, seed=s)(t).index[0].tolist()) for s in range(5)}
    assert len(picks) == 5
    assert torch.equal(_op(8, seed=4)(t).index, _op(8, seed=4)(t).index)


def test_every_position_is_chosen_about_as_often():
    """Over 200 seeds, 8 of 64 positions: each position is expected 25 times."""
    t = VisualTokens(x=torch.randn(1, 64, 1))
    counts = Counter(i for s in range(200) for i in _op(8, seed=s)(t).index[0].tolist())
    assert len(counts) == 64 and min(counts.values()) >= 8 and max(counts.values()) <= 45


def test_ratio_and_edges():
    t = VisualTokens(x=torch.randn(1, 50, 2))
    assert _op(ratio=0.1)(t).counts.tolist() == [5]
    assert _op(1)(t).counts.tolist() == [1]
    assert _op(50)(t) is t and _op(55)(t) is t


def test_per_partition_budgets():
    t = grid_tokens([40, 30], 5, D=3, seed=2, parts=3, signals={"cls_attn": ([22], None)})
    partition_budget_check(lambda k: _op(k, seed=5), t, torch.tensor([[0, 2, 9], [20, 0, 1]]))


def test_stage_and_errors():
    assert _op(3).stage == "vision" and _op(3).requires == {}
    x = torch.randn(1, 5, 2)
    x[0, 1, 1] = float("nan")
    with pytest.raises(InputError, match="'random'"):
        _op(2)(VisualTokens(x=x))
