"""Dispatched aten ops and host syncs per operator call (vtc/ops/opcount.py), gated as regressions.

A host sync (``.item()``, ``bool(t)``, ``nonzero``, a data-dependent shape) stalls the GPU; every
operator whose output count is fixed by its budget must run without one inside a pipeline's fast
mode, and DivPrune's greedy loop must stay at a few ops per step. The counts are deterministic and
device-independent, so they are checked here on the CPU.
"""

import os

import pytest
import torch
from _ops_testlib import CLIP_L, grid_tokens

import vtc
from vtc import Layout, VisualTokens
from vtc.ops.opcount import count_ops

FIXED = ["divprune:keep=16", "divprune:ratio=0.1", "vtc-cls:keep=16", "vtc-cls:ratio=0.2,layers=[20,22]",
         "random:keep=16", "random:ratio=0.3", "uniform:keep=16", "uniform:ratio=0.25", "pool:keep=16",
         "pool:ratio=0.25", "pool:grid=3", "m3:keep=16", "m3:keep=9", "tome:keep=16", "tome:ratio=0.1",
         "tome:r=20", "tome:keep=16,compat=clean,protect_cls=true", "hired:keep=16", "hired:ratio=0.2",
         "globalcom2", "globalcom2:compat=clean,ratio=0.5", "pool:keep=16 | divprune:keep=8",
         "vtc-cls:keep=64 | tome:keep=16 | divprune:keep=8"]


def _tokens(pipe, B=3, side=12, dim=8):
    sig = {}
    for name, layers in pipe.requires.items():
        sig[name] = (CLIP_L.resolve_all(layers), 4 if name == "keys" else None)
    t = grid_tokens([side * side] * B, side, D=dim, seed=0, full=True, signals=sig, dtype=torch.float32)
    return VisualTokens(x=t.x, signals=t.signals, layout=Layout.grid(side), layer_space=CLIP_L)  # default (raster) index


def _fast(pipe, t):
    return count_ops(pipe, t, validate=False)


@pytest.mark.parametrize("spec", FIXED)
def test_fixed_count_operators_never_sync_in_fast_mode(spec):
    pipe = vtc.build(spec)
    t = _tokens(pipe)
    with torch.inference_mode():
        out, c = _fast(pipe, t)
        assert c.syncs == 0, (spec, dict(c.sync_names))
        assert out.mask is None and torch.equal(out.index, pipe(t).index)  # same result as a validated run


@pytest.mark.parametrize("spec", FIXED)
def test_validated_entry_costs_one_sync(spec):
    pipe = vtc.build(spec)
    t = _tokens(pipe)
    _, c = count_ops(pipe.check_input, t)
    assert c.syncs == 1, dict(c.sync_names)


def test_divprune_greedy_step_is_three_ops():
    pipe = vtc.build("divprune:keep=10")
    t = _tokens(pipe)
    _, c10 = _fast(pipe, t)
    _, c30 = _fast(vtc.build("divprune:keep=30"), t)
    per_step = (c30.ops - c10.ops) / 20
    assert per_step == 3 and c10.syncs == c30.syncs == 0
    assert c30.names["argmax"] - c10.names["argmax"] == 20 and c30.names["minimum"] - c10.names["minimum"] == 20


@pytest.mark.parametrize("spec, most", [("divprune:keep=16", 30 + 3 * 16), ("vtc-cls:keep=16", 20),
                                        ("random:keep=16", 25), ("uniform:keep=16", 8), ("pool:keep=16", 12),
                                        ("m3:keep=16", 12), ("hired:keep=16", 12), ("globalcom2", 10)])
def test_op_counts_do_not_regress(spec, most):
    pipe = vtc.build(spec)
    _, c = _fast(pipe, _tokens(pipe))
    assert c.ops <= most, dict(c.names)


def test_tome_steps_are_planned_on_the_host():
    pipe = vtc.build("tome:keep=16")
    _, c = _fast(pipe, _tokens(pipe))  # 144 -> 72 -> 36 -> 18 -> 16: four steps
    assert c.syncs == 0 and c.names["bmm"] == 4 and c.ops <= 4 * 60


@pytest.mark.parametrize("spec, most", [("hired", 1), ("hired:compat=clean", 1), ("globalcom2", 1),
                                        ("globalcom2:compat=clean", 1), ("hired | divprune", 20),
                                        ("globalcom2 | vtc-cls:layers=[22]", 20)])
def test_anyres_allocators_sync_once_for_their_output_width(spec, most):
    """Alone: one sync (the output width depends on the data); a selector filling their per-partition
    budgets regroups tokens by partition (data-dependent shapes): a bounded number."""
    pipe = vtc.build(spec)
    P, side = 5, 6
    sizes = [(60, 100), (100, 60), (80, 80)]
    lays = [Layout.for_anyres(side, (2, 2), image_size=s) for s in sizes]
    req = {}
    for name, layers in pipe.requires.items():
        req[name] = (CLIP_L.resolve_all(layers), None)
    t = grid_tokens([P * side * side] * 3, side, D=6, seed=1, parts=P, full=True, signals=req, dtype=torch.float32)
    t = t.replace(layout=lays)
    out, c = _fast(pipe, t)
    assert c.syncs <= most, dict(c.sync_names)
    assert torch.equal(out.index, pipe(t).index)


def test_complete_grid_in_another_order_pools_the_same():
    """The avg_pool2d path reorders tokens that are a permutation of the grid (index tells where each sits)."""
    t = grid_tokens([144, 144], 12, D=5, seed=2, full=True, signals={"cls_attn": ([22], None)})
    perm = torch.stack([torch.randperm(144, generator=torch.Generator().manual_seed(b)) for b in range(2)])
    shuffled = t.gather(perm)
    assert not shuffled.raster
    for spec in ("m3:keep=16", "pool:keep=16", "pool:keep=20", "uniform:keep=16"):
        a, b = vtc.build(spec)(t), vtc.build(spec)(shuffled)
        if spec.startswith("uniform"):  # a subset: the same tokens, in the shuffled order
            assert [sorted(r) for r in a.index.tolist()] == [sorted(r) for r in b.index.tolist()]
            continue
        assert torch.equal(a.index, b.index)
        torch.testing.assert_close(a.x, b.x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.signals["cls_attn"][22], b.signals["cls_attn"][22], rtol=1e-12, atol=1e-12)


def test_validation_is_once_per_pipeline_not_per_operator():
    pipe = vtc.build("vtc-cls:keep=64,layers=[22] | random:keep=32 | divprune:keep=8")
    t = _tokens(pipe)
    _, whole = count_ops(pipe, t)
    _, fast = _fast(pipe, t)
    assert whole.syncs == 1 and fast.syncs == 0 and whole.names["aminmax"] == 2  # x and one signal, once
    _, direct = count_ops(pipe[0], t)  # an operator called on its own validates its own input
    assert direct.syncs == 1 and direct.names["aminmax"] == 2


@pytest.mark.skipif(os.environ.get("VTC_TEST_COMPILE") != "1",
                    reason="torch.compile of the greedy loop takes minutes on a CPU; set VTC_TEST_COMPILE=1")
def test_divprune_compiled_loop_gives_the_eager_picks():
    from vtc.ops import divprune

    t = grid_tokens([40, 40], 7, D=8, seed=3, dtype=torch.float32)
    eager = vtc.create("divprune", keep=6)(t)
    divprune.set_compile("always")
    try:
        compiled = vtc.create("divprune", keep=6)(t)
    finally:
        divprune.set_compile("auto")
    assert torch.equal(eager.index, compiled.index)


def test_divprune_keeps_one_n_by_n_buffer():
    """The distance matrix is the only [B, N, N] allocation: masks, the first pick and the greedy
    loop all work in place or on [B, N] rows (no copy for a masked fill, no transposed top-k)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    B, N = 2, 96
    big = set()

    class Allocs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() >= B * N * N:
                    big.add(t.untyped_storage().data_ptr())
            return out

    x = torch.randn(B, N, 8)
    for t in (VisualTokens(x=x), VisualTokens(x=x, mask=torch.arange(N).expand(B, N) < torch.tensor([[N], [N - 9]]))):
        big.clear()
        with Allocs():
            vtc.build("divprune:keep=20")(t, validate=False)
        assert len(big) == 1
