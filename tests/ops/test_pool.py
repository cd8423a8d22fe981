"""Pool baseline (vtc/ops/pool.py) against a brute-force fp64 re-implementation of its docstring."""

import math

import numpy as np
import pytest
import torch
from _ops_testlib import assert_batch_equals_alone, grid_tokens, image, np64, partition_budget_check

import vtc
from vtc import Layout, VisualTokens
from vtc.errors import BudgetError, ConfigError, InputError


def ref_grid(k: int, h: int, w: int) -> tuple[int, int]:
    gh = min(max(int(math.floor(math.sqrt(k * h / w))), 1), h)
    return gh, max(min(k // gh, w), 1)


def ref_pool(x, size, index, h, w, gh, gw, parts=1):
    """Tokens of each (partition, cell) averaged with size weights, cells ``(r*gh//h, c*gw//w)``; output
    in partition then raster-cell order, each cell represented by its first member."""
    cells = {}
    for n, i in enumerate(index):
        p, local = divmod(i, h * w)
        r, c = divmod(local, w)
        cells.setdefault((p, r * gh // h, c * gw // w), []).append(n)
    means, first, sizes = [], [], []
    for key in sorted(cells):
        m = cells[key]
        s = sum(size[j] for j in m)
        means.append(sum(size[j] * x[j] for j in m) / s)
        first.append(int(index[m[0]]))
        sizes.append(s)
    return np.stack(means), first, sizes


def _check(out, b, ref):
    means, first, sizes = ref
    n = int(out.counts[b])
    assert out.index[b, :n].tolist() == first
    np.testing.assert_allclose(np64(out.x[b, :n]), means, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np64(out.sizes[b, :n]), sizes, rtol=1e-12)


def _op(keep=None, **kw):
    return vtc.create("pool", **kw) if keep is None else vtc.create("pool", keep=keep, **kw)


def _ref_for(t, b, gh, gw):
    n = int(t.counts[b])
    lay = t.layouts()[b]
    h, w = lay.grids[0]
    return ref_pool(np64(t.x[b, :n]), np64(t.sizes[b, :n]), t.index[b, :n].tolist(), h, w, gh, gw)


@pytest.mark.parametrize("h, w, k", [(24, 24, 64), (24, 24, 128), (10, 10, 64), (6, 9, 10), (7, 5, 1), (5, 5, 24)])
def test_full_grid_against_reference(h, w, k):
    t = grid_tokens([h * w], h, w, D=3, seed=h * w + k, full=True)
    out = _op(k)(t)
    gh, gw = ref_grid(k, h, w)
    assert out.counts.tolist() == [gh * gw] and gh * gw <= k
    _check(out, 0, _ref_for(t, 0, gh, gw))


def test_documented_examples():
    t = grid_tokens([576], 24, D=2, seed=0, full=True)
    assert _op(64)(t).counts.tolist() == [64]
    assert _op(128)(t).counts.tolist() == [121]
    assert _op(grid=6)(t).counts.tolist() == [36]
    assert _op(grid=[4, 8])(t).counts.tolist() == [32]
    assert _op(ratio=0.25)(t).counts.tolist() == [144]


def test_grid_argument():
    t = grid_tokens([48], 6, 8, D=3, seed=1, full=True)
    _check(_op(grid=[4, 3])(t), 0, _ref_for(t, 0, 4, 3))
    with pytest.raises(ConfigError, match="not both"):
        _op(4, grid=[2, 2])


def test_pruned_grids_pool_the_tokens_present():
    t = grid_tokens([100, 61, 7], 12, D=3, seed=2, size=True, signals={"cls_attn": ([22], None)})
    out = assert_batch_equals_alone(_op(16), t, rtol=1e-12, atol=1e-12)
    for b in range(3):
        n = int(t.counts[b])
        if n <= 16:
            continue
        _check(out, b, _ref_for(t, b, 4, 4))
    torch.testing.assert_close(out.size.sum(1)[:2], t.sizes.sum(1)[:2])
    torch.testing.assert_close(out.signals["cls_attn"][22].sum(1), t.signals["cls_attn"][22].sum(1))


def test_image_that_fits_is_untouched_inside_a_batch():
    t = grid_tokens([144, 10], 12, D=3, seed=3)
    out = _op(16)(t)
    assert out.counts.tolist() == [16, 10]
    assert out.index[1, :10].tolist() == t.index[1, :10].tolist() and out.size[1, :10].tolist() == [1.0] * 10


def test_several_partitions_share_the_image_budget():
    t = grid_tokens([5 * 576], 24, D=2, seed=4, parts=5, full=True)
    assert _op(ratio=0.25)(t).counts.tolist() == [720]  # 144 = 12x12 per partition
    out = _op(64)(t)  # 12 per partition -> 3x4
    assert out.counts.tolist() == [60] and out.group[0].tolist() == [p for p in range(5) for _ in range(12)]
    for p in range(5):
        sel = t.group[0] == p
        ref = ref_pool(np64(t.x[0, sel]), [1.0] * 576, (t.index[0, sel] - 576 * p).tolist(), 24, 24, 3, 4)
        assert (out.index[0, 12 * p: 12 * p + 12] - 576 * p).tolist() == ref[1]
        np.testing.assert_allclose(np64(out.x[0, 12 * p: 12 * p + 12]), ref[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(BudgetError, match="5 partitions"):
        _op(3)(t)


def test_per_partition_budgets():
    t = grid_tokens([60, 45], 5, D=3, seed=5, parts=3, signals={"cls_attn": ([22], None)})
    out = partition_budget_check(_op, t, torch.tensor([[4, 0, 9], [1, 25, 6]]), rtol=1e-12, atol=1e-12, exact=False)
    assert (out.group[0, : out.counts[0]] == 1).sum() == 0


def test_edge_budgets():
    t = grid_tokens([36], 6, D=3, seed=6, full=True)
    one = _op(1)(t)
    assert one.counts.tolist() == [1] and one.size.tolist() == [[36.0]]
    torch.testing.assert_close(one.x[0, 0], t.x[0].mean(0))
    assert _op(36)(t) is t and _op(41)(t) is t


def test_deterministic_stage_and_errors():
    t = grid_tokens([36], 6, seed=7, full=True)
    assert torch.equal(_op(9)(t).x, _op(9)(t).x) and _op(9).stage == "llm"
    t.x[0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="'pool'"):
        _op(9)(t)


def test_needs_a_grid():
    with pytest.raises(vtc.errors.LayoutError, match="square"):
        _op(4)(VisualTokens(x=torch.randn(1, 10, 2)))
    one = image(grid_tokens([12], 3, 4, seed=8, full=True), 0)
    assert one.layout == Layout.grid(3, 4) and _op(4)(one).counts.tolist() == [4]


def test_budget_is_never_exceeded_on_tall_or_wide_grids():
    """Issue 16 item 6: gh = floor(sqrt(k*h/w)) can exceed k on a tall grid (4x1, keep=1 gave 2)."""
    assert _op(1)(VisualTokens(x=torch.randn(1, 4, 2), layout=Layout.grid(4, 1))).counts.tolist() == [1]
    for h, w in ((4, 1), (9, 1), (7, 2), (5, 2), (1, 6), (2, 7), (3, 3), (6, 4)):
        t = VisualTokens(x=torch.randn(2, h * w, 2, dtype=torch.float64), layout=Layout.grid(h, w))
        for k in range(1, h * w):
            n = _op(k)(t).counts.tolist()
            assert max(n) <= k, (h, w, k, n)
            # the same on a pruned (padded) batch, which takes the general path
            pruned = VisualTokens(x=t.x, layout=t.layout, mask=torch.arange(h * w).expand(2, -1) < h * w - 1)
            assert max(_op(k)(pruned).counts.tolist()) <= k


def test_bf16_sizes_count_exactly():
    """Issue 16 item 10: sizes are kept in float32 for half-precision features (bf16 cannot hold 289)."""
    t = VisualTokens(x=torch.randn(1, 289, 8).bfloat16(), layout=Layout.grid(17))
    out = _op(1)(t)
    assert out.size.dtype == torch.float32 and out.size.tolist() == [[289.0]] and out.x.dtype == torch.bfloat16
    torch.testing.assert_close(out.x[0, 0].float(), t.x[0].float().mean(0), rtol=1e-2, atol=1e-2)
    assert _op(keep=4)(t.replace(x=t.x.half())).size.dtype == torch.float32
