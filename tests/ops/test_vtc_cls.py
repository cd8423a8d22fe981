"""VTC-CLS (vtc/ops/vtc_cls.py) against a brute-force fp64 re-implementation of methods.md §2."""

import pytest
import torch
from _ops_testlib import (
    CLIP_L,
    assert_batch_equals_alone,
    assert_kept_aligned,
    grid_tokens,
    np64,
    partition_budget_check,
    top_k_positions,
)

import vtc
from vtc import VisualTokens
from vtc.errors import InputError, SignalError

LAYERS = list(range(16, 23))


def ref_vtc_cls(attn: dict, layers, k: int) -> list[int]:
    """score_j = sum over layers (in order) of the CLS->patch attention; top-k (ties: lower position);
    returned in raster (position) order."""
    N = len(next(iter(attn.values())))
    score = [0.0] * N
    for l in layers:
        a = attn[l]
        for j in range(N):
            score[j] += float(a[j])
    return sorted(top_k_positions(score, k))


def _op(keep=None, **kw):
    return vtc.create("vtc-cls", **kw) if keep is None else vtc.create("vtc-cls", keep=keep, **kw)


def _attn(t, b):
    n = int(t.counts[b])
    return {l: np64(s[b, :n]) for l, s in t.signals["cls_attn"].items()}


@pytest.mark.parametrize("seed, N, k, layers", [(0, 36, 1, LAYERS), (1, 64, 10, LAYERS), (2, 49, 48, [22]),
                                                (3, 30, 7, [20, 16, 22])])
def test_exact_sequence_against_reference(seed, N, k, layers):
    t = grid_tokens([N], 8, D=4, seed=seed, signals={"cls_attn": (list(range(0, 24)), None)})
    out = _op(k, layers=layers)(t)
    pos = ref_vtc_cls(_attn(t, 0), layers, k)
    assert out.index[0].tolist() == t.index[0, pos].tolist()
    torch.testing.assert_close(out.x[0], t.x[0, pos], rtol=0, atol=0)


def test_default_layers_are_the_seven_ending_at_the_feature_layer():
    assert _op(3).config.layers == ["feature-6..feature"] and _op(3).requires == {"cls_attn": ["feature-6..feature"]}
    assert CLIP_L.resolve_all(_op(3).requires["cls_attn"]) == LAYERS  # 16..22 on LLaVA-1.5's CLIP-L
    assert _op(3, layers=[22, 16, 22]).requires == {"cls_attn": [16, 22]}
    assert _op(3).stage == "vision"
    for bad in (["features"], ["16..feature..22"], [1.5], ["2/2"]):
        with pytest.raises(vtc.errors.ConfigError, match="vtc-cls.layers"):
            _op(3, layers=bad)


def test_reads_exactly_the_configured_layers():
    """One-hot marker per layer: layer l puts all its attention on patch l."""
    N = 30
    attn = {l: torch.nn.functional.one_hot(torch.tensor([l]), N).double() for l in range(24)}
    t = VisualTokens(x=torch.randn(1, N, 4, dtype=torch.float64), signals={"cls_attn": attn}, layer_space=CLIP_L)
    assert _op(7)(t).index[0].tolist() == LAYERS
    assert _op(4, layers=["feature-2..feature", 22, "last"])(t).index[0].tolist() == [20, 21, 22, 23]
    assert _op(1, layers=[9])(t).index[0].tolist() == [9]
    assert _op(2, layers=[23, 0])(t).index[0].tolist() == [0, 23]


def test_ties_go_to_the_lower_position():
    attn = {l: torch.tensor([[0.1, 0.3, 0.2, 0.3, 0.3, 0.1]]) for l in LAYERS}
    t = VisualTokens(x=torch.randn(1, 6, 2), signals={"cls_attn": attn}, layer_space=CLIP_L)
    assert _op(2)(t).index[0].tolist() == [1, 3]
    assert _op(4)(t).index[0].tolist() == [1, 2, 3, 4]


def test_batch_of_three_with_variable_counts_equals_each_alone():
    t = grid_tokens([50, 12, 36], 8, D=5, seed=4, signals={"cls_attn": (LAYERS, None)}, size=True)
    out = assert_batch_equals_alone(_op(16), t)
    assert out.counts.tolist() == [16, 12, 16]
    for b in range(3):
        pos = ref_vtc_cls(_attn(t, b), LAYERS, min(16, int(t.counts[b])))
        assert out.index[b, : out.counts[b]].tolist() == t.index[b, pos].tolist()


def test_fields_and_signals_stay_aligned():
    t = grid_tokens([40, 25], 8, seed=5, size=True, signals={"cls_attn": (LAYERS, None), "keys": ([22], 3)})
    out = _op(ratio=0.25)(t)
    assert out.counts.tolist() == [10, 6]
    assert_kept_aligned(t, out)


def test_deterministic():
    t = grid_tokens([40, 25], 8, seed=6, signals={"cls_attn": (LAYERS, None)})
    assert torch.equal(_op(9)(t).index, _op(9)(t).index)


def test_edge_budgets():
    t = grid_tokens([20], 5, seed=7, signals={"cls_attn": (LAYERS, None)})
    assert _op(1)(t).index[0].tolist() == t.index[0, ref_vtc_cls(_attn(t, 0), LAYERS, 1)].tolist()
    assert _op(20)(t) is t and _op(25)(t) is t


def test_per_partition_budgets():
    t = grid_tokens([45, 30], 5, seed=8, parts=3, signals={"cls_attn": (LAYERS, None)})
    partition_budget_check(_op, t, torch.tensor([[0, 3, 25], [5, 1, 0]]))


def test_missing_signal_names_op_signal_and_layer():
    t = VisualTokens(x=torch.randn(1, 10, 4), signals={"cls_attn": {l: torch.rand(1, 10) for l in (17, 18)}},
                     layer_space=CLIP_L)
    with pytest.raises(SignalError) as e:
        _op(3, layers=[17, 18, 21])(t)
    msg = str(e.value)
    assert "'vtc-cls'" in msg and "'cls_attn'" in msg and "layer 21" in msg
    with pytest.raises(SignalError, match="layer 16"):
        _op(3)(VisualTokens(x=torch.randn(1, 10, 4), layer_space=CLIP_L))
    with pytest.raises(SignalError, match="'feature-6..feature', which is relative to the tower's depth"):
        _op(3)(VisualTokens(x=torch.randn(1, 10, 4), signals={"cls_attn": {22: torch.rand(1, 10)}}))


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_features_raise(bad):
    t = grid_tokens([10], 4, seed=9, signals={"cls_attn": (LAYERS, None)})
    t.x[0, 2, 0] = bad
    with pytest.raises(InputError, match="'vtc-cls'"):
        _op(3)(t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sums_the_layers_with_one_rounding(dtype):
    """The official code stacks the layers' CLS attention and sums them in one reduction, in the
    model's dtype; adding layer by layer rounds after every layer and keeps other boundary tokens."""
    g = torch.Generator().manual_seed(5)
    differs = 0
    for _ in range(6):
        B, N, k = 2, 576, 64
        attn = {l: torch.rand(B, N, generator=g).softmax(-1).to(dtype) for l in LAYERS}
        t = VisualTokens(x=torch.randn(B, N, 4, generator=g).to(dtype), signals={"cls_attn": attn}, layer_space=CLIP_L)
        out = _op(k)(t)
        score = torch.stack([attn[l] for l in LAYERS]).sum(0)  # one rounding, in dtype
        running = attn[LAYERS[0]].clone()
        for l in LAYERS[1:]:
            running = running + attn[l]  # a rounding per layer
        for b in range(B):
            want = sorted(top_k_positions(score[b].tolist(), k))
            assert out.index[b].tolist() == want
            differs += want != sorted(top_k_positions(running[b].tolist(), k))
    assert differs > 0
