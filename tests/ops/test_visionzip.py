"""VisionZip (vtc/ops/visionzip.py) against a brute-force re-implementation of its published rule."""

import pytest
import torch
from _ops_testlib import CLIP_L, assert_batch_equals_alone, grid_tokens, top_k_positions

import vtc
from vtc import Layout, VisualTokens
from vtc.errors import ConfigError, SignalError
from vtc.ops.visionzip import CLS_INDEX


def ref_visionzip(x, score, keys, index, D, C, cls_x=None):
    """One image (or partition): ``[CLS?, dominant in order, contextual]`` as (features, indices)."""
    n = len(index)
    d_patch = D - (cls_x is not None)
    dom = sorted(top_k_positions(score, min(d_patch, n)))
    rem = [i for i in range(n) if i not in dom]
    out_x = ([cls_x] if cls_x is not None else []) + [x[i] for i in dom]
    out_i = ([CLS_INDEX] if cls_x is not None else []) + [int(index[i]) for i in dom]
    if C > 0 and rem:
        step = max(1, len(rem) // C)
        targets = rem[::step][:C]
        others = [i for i in rem if i not in targets]
        m = keys / keys.norm(dim=-1, keepdim=True)
        joined = {t: [] for t in targets}
        for i in others:
            sims = [float(m[i] @ m[t]) for t in targets]
            joined[targets[sims.index(max(sims))]].append(i)
        for t in targets:
            extra = torch.stack([x[i] for i in joined[t]]).mean(0) if joined[t] else torch.zeros_like(x[t])
            out_x.append(x[t] + extra)
            out_i.append(int(index[t]))
    return torch.stack(out_x), out_i


def _check(out, b, want_x, want_i):
    n = int(out.counts[b])
    assert out.index[b, :n].tolist() == want_i
    torch.testing.assert_close(out.x[b, :n], want_x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("signal", ["cls_attn", "attn_received"])
def test_clean_matches_reference_on_a_batch(signal):
    t = grid_tokens([36, 30, 25], 6, D=5, seed=4, signals={signal: ([22], None), "keys": ([22], 4)})
    op = vtc.create("visionzip", keep=20, signal=signal, compat="clean")
    out = assert_batch_equals_alone(op, t, atol=1e-12)
    D, C = 20 - 20 * 5 // 32, 20 * 5 // 32  # 17 + 3
    for b in range(3):
        n = int(t.counts[b])
        want_x, want_i = ref_visionzip(t.x[b, :n], t.signals[signal][22][b, :n], t.signals["keys"][22][b, :n],
                                       t.index[b, :n], D, C)
        _check(out, b, want_x, want_i)
        # size and CLS attention: contextual tokens sum their members
        assert float(out.sizes[b].sum()) == pytest.approx(float(t.sizes[b, :n].sum()))


def test_official_keeps_the_cls_token_and_counts_it_as_dominant():
    base = grid_tokens([25, 25], 5, D=4, seed=1, full=True, signals={"cls_attn": ([22], None), "keys": ([22], 3)})
    cls_x = torch.randn(2, 1, 4, dtype=torch.float64)
    # the integration hands in the CLS token first, index CLS_INDEX (its signals are not read)
    t = VisualTokens(x=torch.cat([cls_x, base.x], 1), index=torch.cat([torch.full((2, 1), CLS_INDEX), base.index], 1),
                     signals={k: {22: torch.cat([torch.zeros(2, 1, *v[22].shape[2:], dtype=v[22].dtype), v[22]], 1)}
                              for k, v in base.signals.items()}, layout=base.layout, layer_space=CLIP_L)
    op = vtc.create("visionzip", dominant=6, contextual=4)
    assert op.wants_cls_token
    out = op(t)
    assert out.counts.tolist() == [10, 10]
    for b in range(2):
        want_x, want_i = ref_visionzip(base.x[b], base.signals["cls_attn"][22][b], base.signals["keys"][22][b],
                                       base.index[b], 6, 4, cls_x=cls_x[b, 0])
        _check(out, b, want_x, want_i)
    with pytest.raises(SignalError, match="CLS token"):
        op(base)
    assert not vtc.create("visionzip", signal="attn_received").wants_cls_token
    # clean drops a CLS token it is given and keeps D patches
    clean = vtc.create("visionzip", dominant=6, contextual=4, compat="clean")(t)
    assert CLS_INDEX not in clean.index.tolist()[0] and clean.counts.tolist() == [10, 10]


def test_per_partition_like_the_official_anyres_code():
    t = grid_tokens([48], 4, D=4, seed=3, parts=3, full=True, signals={"cls_attn": ([22], None), "keys": ([22], 3)})
    t = t.replace(layout=Layout.for_anyres(4, (1, 2), image_size=(4, 8)))
    out = vtc.create("visionzip", dominant=5, contextual=2, compat="clean")(t)
    assert out.counts.tolist() == [21]
    for p in range(3):
        sl = slice(16 * p, 16 * (p + 1))
        want_x, want_i = ref_visionzip(t.x[0, sl], t.signals["cls_attn"][22][0, sl], t.signals["keys"][22][0, sl],
                                       t.index[0, sl], 5, 2)
        assert out.index[0, 7 * p:7 * (p + 1)].tolist() == want_i
        torch.testing.assert_close(out.x[0, 7 * p:7 * (p + 1)], want_x, rtol=1e-12, atol=1e-12)
    # keep= is split equally per partition (floored under official: 20 // 3 = 6 each)
    one = vtc.create("visionzip", keep=20, compat="clean")(t)
    assert one.counts.tolist() == [20] and sorted(one.group[0].tolist()) == [0] * 7 + [1] * 7 + [2] * 6


def test_budget_presets_and_errors():
    op = vtc.create("visionzip", keep=64)
    assert [tuple(v.tolist()) for v in op.split(torch.tensor([64, 128, 192]))] == [(54, 108, 162), (10, 20, 30)]
    with pytest.raises(ConfigError, match="visionzip takes"):
        vtc.create("visionzip", dominant=10)
    with pytest.raises(ConfigError, match="visionzip takes"):
        vtc.create("visionzip", dominant=10, contextual=2, keep=12)
    assert vtc.create("visionzip", keep=8).requires == {"cls_attn": ["feature"], "keys": ["feature"]}
    assert CLIP_L.resolve("feature") == 22  # the official layer on LLaVA-1.5's CLIP-L
    assert (op.newline_policy, op.sees_padding) == ("none", True)
    assert (vtc.create("visionzip", keep=8, compat="clean").newline_policy,
            vtc.create("visionzip", keep=8, compat="clean").sees_padding) \
        == (None, False)
