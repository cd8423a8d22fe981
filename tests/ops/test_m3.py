"""M3 nested pooling (vtc/ops/m3.py) against a brute-force fp64 re-implementation of methods.md §5b."""

import numpy as np
import pytest
import torch
from _ops_testlib import assert_batch_equals_alone, grid_tokens, image, np64

import vtc
from vtc import Layout, VisualTokens
from vtc.errors import ConfigError, InputError, LayoutError


def ref_m3(x: np.ndarray, index: list[int], h: int, s: int, offset: int = 0):
    """avg_pool2d with kernel = stride = h / sqrt(s) over an h x h raster grid, written as loops over
    cells; tokens missing from the grid (pruned earlier) are left out of their cell's mean, empty cells
    give no token. Returns (cell means, first original index of each cell, member count), raster order."""
    side = int(round(s ** 0.5))
    kk = h // side
    pos = {i - offset: n for n, i in enumerate(index)}
    means, first, count = [], [], []
    for ci in range(side):
        for cj in range(side):
            members = [pos[r * h + c] for r in range(ci * kk, (ci + 1) * kk) for c in range(cj * kk, (cj + 1) * kk)
                       if r * h + c in pos]
            if members:
                means.append(sum(x[m] for m in members) / len(members))
                first.append(int(index[members[0]]))
                count.append(len(members))
    return np.stack(means), first, count


def _op(keep, **kw):
    return vtc.create("m3", keep=keep, **kw)


@pytest.mark.parametrize("s", [576, 144, 36, 9, 1])
def test_llava_scales_against_reference(s):
    t = grid_tokens([576], 24, D=4, seed=s, full=True)
    out = _op(s)(t)
    assert out.counts.tolist() == [s]
    if s == 576:
        assert out is t
        return
    means, first, count = ref_m3(np64(t.x[0]), t.index[0].tolist(), 24, s)
    assert out.index[0].tolist() == first
    np.testing.assert_allclose(np64(out.x[0]), means, rtol=1e-12, atol=1e-12)
    assert out.size[0].tolist() == count == [576 // s] * s


def test_scales_are_nested():
    """Each coarse token is the mean of its 4 children at the next finer scale (9 -> 1: a 3x3 mean)."""
    t = grid_tokens([576], 24, D=3, seed=1, full=True, dtype=torch.float64)
    levels = {s: _op(s)(t).x[0] for s in (576, 144, 36, 9, 1)}
    for fine, coarse in ((576, 144), (144, 36), (36, 9)):
        side = int(fine ** 0.5)
        g = levels[fine].reshape(side, side, -1)
        children = (g[0::2, 0::2] + g[0::2, 1::2] + g[1::2, 0::2] + g[1::2, 1::2]) / 4
        torch.testing.assert_close(children.reshape(-1, 3), levels[coarse], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(levels[9].mean(0, keepdim=True), levels[1], rtol=1e-12, atol=1e-12)


def test_other_square_grids_and_sides():
    t = grid_tokens([36], 6, D=3, seed=2, full=True)
    for s in (9, 4, 1):
        means, first, _ = ref_m3(np64(t.x[0]), t.index[0].tolist(), 6, s)
        out = _op(s)(t)
        assert out.index[0].tolist() == first
        np.testing.assert_allclose(np64(out.x[0]), means, rtol=1e-12, atol=1e-12)


def test_without_layout_a_square_grid_is_assumed():
    x = torch.randn(1, 16, 3, dtype=torch.float64)
    out = _op(4)(VisualTokens(x=x))
    assert out.index[0].tolist() == [0, 2, 8, 10]
    torch.testing.assert_close(out.x[0, 0], x[0, [0, 1, 4, 5]].mean(0))


@pytest.mark.parametrize("keep", [576, 900, 2304])
def test_keep_at_least_the_grid_is_a_no_op(keep):
    t = grid_tokens([576], 24, D=2, seed=3, full=True)
    out = _op(keep)(t)
    assert torch.equal(out.x, t.x) and torch.equal(out.index, t.index)


@pytest.mark.parametrize("keep, words", [(25, "divisible by 5"), (49, "divisible by 7"), (100, "divisible by 10")])
def test_invalid_scale_for_the_grid_raises(keep, words):
    t = grid_tokens([576], 24, D=2, seed=3, full=True)
    with pytest.raises(ConfigError, match=words) as e:
        _op(keep)(t)
    assert "576, 144" in str(e.value)  # lists the valid values


@pytest.mark.parametrize("keep", [0, -4, 5, 12, 575])
def test_non_square_keep_is_a_config_error(keep):
    with pytest.raises(ConfigError, match="square"):
        _op(keep)


def test_non_square_partition_raises():
    t = VisualTokens(x=torch.randn(1, 12, 2), layout=Layout.grid(3, 4))
    with pytest.raises(LayoutError, match="square"):
        _op(1)(t)


def test_anyres_pools_every_partition_on_its_own():
    t = grid_tokens([5 * 36], 6, D=3, seed=4, parts=5, full=True, signals={"cls_attn": ([22], None)})
    out = _op(9)(t)
    assert out.counts.tolist() == [45] and out.group[0].tolist() == [p for p in range(5) for _ in range(9)]
    for p in range(5):
        sel = t.group[0] == p
        means, first, _ = ref_m3(np64(t.x[0, sel]), t.index[0, sel].tolist(), 6, 9, offset=36 * p)
        assert out.index[0, 9 * p: 9 * p + 9].tolist() == first
        np.testing.assert_allclose(np64(out.x[0, 9 * p: 9 * p + 9]), means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.signals["cls_attn"][22].sum(1), t.signals["cls_attn"][22].sum(1))


def test_batch_of_three_with_pruned_grids_equals_each_alone():
    t = grid_tokens([144, 100, 37], 12, D=4, seed=5, size=True, signals={"cls_attn": ([22], None)})
    out = assert_batch_equals_alone(_op(9), t, rtol=1e-12, atol=1e-12)
    for b in range(3):
        one = image(t, b)
        n = int(t.counts[b])
        # size-weighted mean over the tokens present in each cell
        x, sz = np64(one.x[0]), np64(one.size[0])
        means, first, _ = ref_m3(x * sz[:, None], one.index[0].tolist(), 12, 9)
        weights, _, _ = ref_m3(sz[:, None], one.index[0].tolist(), 12, 9)
        assert out.index[b, : out.counts[b]].tolist() == first
        np.testing.assert_allclose(np64(out.x[b, : out.counts[b]]), means / weights, rtol=1e-12, atol=1e-12)
        assert float(out.size[b].sum()) == pytest.approx(float(sz[:n].sum()))


def test_deterministic_and_stage():
    t = grid_tokens([144], 12, seed=6, full=True)
    assert torch.equal(_op(16)(t).x, _op(16)(t).x)
    assert _op(16).stage == "llm" and _op(16).requires == {}


def test_non_finite_features_raise():
    t = grid_tokens([36], 6, seed=7, full=True)
    t.x[0, 5, 0] = float("inf")
    with pytest.raises(InputError, match="'m3'"):
        _op(9)(t)
