"""Invariants every registered operator must keep, checked with hypothesis on synthetic tokens.

The operators come from ``vtc.list_ops()``, so an operator registered later is checked without
editing this file: its required signals are synthesised from ``op.requires`` and it is built with
``keep=k`` (or ``ratio``) unless :data:`ARGS` says how. An operator that cannot run on synthetic
tokens at all goes into :data:`SKIP` with the reason.

Invariants: at most the budget per image (per partition under ``budget``), no image emptied by a
positive budget, kept indices unique and drawn from the input's, group follows index, left-packed
mask, every field and signal aligned (a kept token is an unchanged input token; a merged token
preserves the total size and CLS-attention mass of its image, or of its partition under
per-partition budgets, and is a convex mix of those features), the input is not modified, runs are deterministic, and a batch gives what
each image gives alone.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from _ops_testlib import CLIP_L, grid_tokens, image, rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vtc
from vtc import Layout
from vtc.errors import BudgetError, InputError, SignalError
from vtc.registry import get_op

#: operators that need model-specific inputs synthetic tokens cannot provide: name -> reason
SKIP: dict[str, str] = {
    "mqt": "replaces the projector: its outputs are learned-query tokens, not a subset or merge of the input "
           "(tests/ops/test_mqt.py checks it against a brute-force reference)",
}


def _m3_args(k: int, h: int, parts: int) -> dict:
    """m3 takes a square per partition whose side divides the grid side: the largest one <= k."""
    side = max(d for d in range(1, h + 1) if h % d == 0 and d * d <= max(k, 1))
    return {"keep": side * side}


def _pool_args(k: int, h: int, parts: int) -> dict:
    """pool keeps at least one token per partition (it raises BudgetError below that)."""
    return {"keep": max(k, parts)}


#: arguments an operator always gets here: visionzip's official mode needs the tower's CLS token among
#: the tokens, which synthetic tokens do not hold (tests/ops/test_visionzip.py covers it)
FIXED = {"visionzip": {"compat": "clean"}}


#: per-op arguments for a per-image budget ``k`` on ``parts`` partitions of ``h x h`` (default: ``keep=k``)
ARGS = {"m3": _m3_args, "pool": _pool_args}

#: operators that both drop and merge, or whose merged tokens are not convex mixes: name -> reason
NOT_CONSERVATIVE = {"visionzip": "a contextual token is its target plus the mean of the tokens that joined it, "
                                 "and with no contextual budget the other tokens are dropped"}

#: in-LLM operators (stage llm_layer) decide on a LayerContext, not on VisualTokens (tests/ops/test_llm_layer.py)
OPS = [name for name in vtc.list_ops() if name not in SKIP and get_op(name).default_stage != "llm_layer"]
#: examples per operator and test; ``VTC_PROPERTY_EXAMPLES=300`` for a thorough run by hand
EXAMPLES = int(os.environ.get("VTC_PROPERTY_EXAMPLES", "25"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def make_op(name: str, k: int | None, h: int, parts: int = 1):
    fixed = FIXED.get(name, {})
    if k is None:  # the budget comes from VisualTokens.budget
        return vtc.create(name, **fixed)
    if name in ARGS:
        return vtc.create(name, **ARGS[name](k, h, parts), **fixed)
    fields = {f.name for f in dataclasses.fields(get_op(name).Config)}
    return vtc.create(name, keep=k, **fixed) if "keep" in fields else vtc.create(name, **fixed)


def signals_for(op, extra_layers=(22,)) -> dict:
    """``grid_tokens`` signal spec: every required signal plus a passenger CLS attention to track."""
    spec = {"cls_attn": (set(extra_layers), None)}
    for name, layers in op.requires.items():
        trail = 4 if name == "keys" else None
        old = spec.get(name, (set(), trail))[0]
        spec[name] = (set(old) | set(CLIP_L.resolve_all(layers)), trail)
    return {k: (sorted(v[0]), v[1]) for k, v in spec.items()}


@st.composite
def cases(draw):
    h = draw(st.integers(2, 6))
    parts = draw(st.integers(1, 3))
    B = draw(st.integers(1, 3))
    n_max = parts * h * h
    counts = [draw(st.integers(1, n_max)) for _ in range(B)]
    full = draw(st.booleans())
    k = draw(st.integers(1, n_max + 3))
    budget = None
    if parts > 1 and draw(st.booleans()):
        budget = torch.tensor([[draw(st.integers(0, h * h + 2)) for _ in range(parts)] for _ in range(B)])
    return dict(h=h, parts=parts, counts=counts, full=full, k=k, budget=budget,
                size=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def as_anyres(t, h, parts):
    """Allocators (hired, globalcom2) split budgets over LLaVA-NeXT AnyRes crops: give ``parts``
    complete partitions an AnyRes layout (base + a 1 x (parts-1) crop grid, nothing unpadded)."""
    return t.replace(layout=Layout.for_anyres(h, (1, parts - 1), image_size=(h, (parts - 1) * h)))


def _tokens(case, op):
    anyres = op.allocates and case["parts"] > 1
    t = grid_tokens(case["counts"], case["h"], D=4, seed=case["seed"], parts=case["parts"],
                    full=case["full"] or anyres, size=case["size"], signals=signals_for(op))
    if anyres:
        t = as_anyres(t, case["h"], case["parts"])
    return t if case["budget"] is None else t.replace(budget=case["budget"])


def _snapshot(t):
    return {b: {k: v.clone() for k, v in rows(t, b).items()} for b in range(t.batch_size)}


def check_invariants(name, op, t, out, case):
    B = t.batch_size
    assert isinstance(out, vtc.VisualTokens) and out.batch_size == B
    # left-packed mask, aligned shapes
    if out.mask is not None:
        n = out.mask.sum(1, keepdim=True)
        assert torch.equal(out.mask, torch.arange(out.num_tokens).unsqueeze(0) < n)
    N2 = out.num_tokens
    assert out.index.shape == (B, N2) and out.x.shape == (B, N2, t.dim)
    assert out.size is None or out.size.shape == (B, N2)
    assert out.group is None or out.group.shape == (B, N2)
    assert set(out.signals) == set(t.signals)
    for sig, per_layer in out.signals.items():
        assert set(per_layer) == set(t.signals[sig])
        for l, s in per_layer.items():
            assert s.shape[:2] == (B, N2) and s.shape[2:] == t.signals[sig][l].shape[2:]
    budget = case["budget"]
    for b in range(B):
        ri, ro = rows(t, b), rows(out, b)
        n_in, n_out = len(ri["index"]), len(ro["index"])
        # budgets
        if op.selects and budget is not None:
            for p in range(budget.shape[1]):
                assert int((ro["group"] == p).sum()) <= int(budget[b, p])
        elif name == "m3":
            for p in range(case["parts"]):
                assert int((ro["group"] == p).sum()) <= op.config.keep
        elif case.get("limits") is not None:
            assert case["limits"][b][0] <= n_out <= case["limits"][b][1], (n_out, case["limits"][b])
        elif op.selects:
            k = op.config.keep if getattr(op.config, "keep", None) is not None else case["k"]
            assert n_out <= k
        if budget is None and n_in > 0:
            assert n_out >= 1
        # indices: unique, drawn from the input, group follows index
        idx_in = ri["index"].tolist()
        where = {v: i for i, v in enumerate(idx_in)}
        idx_out = ro["index"].tolist()
        assert len(set(idx_out)) == n_out and set(idx_out) <= set(idx_in)
        src = torch.tensor([where[v] for v in idx_out], dtype=torch.long)
        assert torch.equal(ro["group"], ri["group"][src])
        # kept tokens are unchanged input tokens; otherwise each partition's tokens merged conservatively
        kept = all(torch.equal(ro[k], ri[k][src]) for k in ri)
        if not kept and name not in NOT_CONSERVATIVE:
            # under per-partition budgets each partition is reduced on its own (one with budget 0 may
            # vanish); without, an operator may merge across partitions (tome does), so check the image
            if budget is not None:
                pairs = [(ri["group"] == p, ro["group"] == p) for p in set(ro["group"].tolist())]
            else:
                pairs = [(torch.ones(n_in, dtype=torch.bool), torch.ones(n_out, dtype=torch.bool))]
            for pi, po in pairs:
                torch.testing.assert_close(ro["size"][po].sum(), ri["size"][pi].sum(), rtol=1e-9, atol=1e-9)
                for key in ri:
                    if key.startswith("cls_attn["):
                        torch.testing.assert_close(ro[key][po].sum(), ri[key][pi].sum(), rtol=1e-9, atol=1e-12)
                lo, hi = ri["x"][pi].min(0).values, ri["x"][pi].max(0).values
                assert bool((ro["x"][po] >= lo - 1e-9).all() and (ro["x"][po] <= hi + 1e-9).all())


def _same(a, b, atol=1e-12):
    assert torch.equal(a.counts, b.counts)
    for i in range(a.batch_size):
        ra, rb = rows(a, i), rows(b, i)
        assert ra.keys() == rb.keys()
        for k in ra:
            torch.testing.assert_close(ra[k], rb[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("name", OPS)
@SETTINGS
@given(case=cases())
def test_invariants(name, case):
    if case["budget"] is not None and (get_op(name).allocates or not get_op(name).selects):
        case = dict(case, budget=None)  # allocators set budgets themselves; non-selectors take none
    k = None if case["budget"] is not None else case["k"]
    op = make_op(name, k, case["h"], case["parts"])
    t = _tokens(case, op)
    before = _snapshot(t)
    out = op(t)
    check_invariants(name, op, t, out, case)
    # the input is untouched, runs are deterministic, a batch gives what each image gives alone
    for b, fields in before.items():
        after = rows(t, b)
        assert all(torch.equal(fields[key], after[key]) for key in fields)
    _same(out, op(t), atol=0)
    for b in range(t.batch_size):
        alone = op(image(t, b))
        _same(image(out, b), alone)


@pytest.mark.parametrize("name", [n for n in OPS if get_op(n).allocates])
def test_allocators_write_fillable_budgets(name):
    op = make_op(name, 5, 4)
    t = as_anyres(grid_tokens([48, 48], 4, D=4, seed=1, parts=3, full=True, signals=signals_for(op)), 4, 3)
    alloc = op.allocate(t)
    assert alloc.budget is not None and alloc.budget.shape[0] == 2 and alloc.budget.dtype == torch.long
    assert bool((alloc.budget >= 0).all())
    filled = vtc.build([op, vtc.create("random")])(t)
    for b in range(2):
        g = rows(filled, b)["group"]
        for p in range(alloc.budget.shape[1]):
            assert int((g == p).sum()) <= int(alloc.budget[b, p])


@pytest.mark.parametrize("name", OPS)
def test_non_finite_features_raise(name):
    op = make_op(name, 4, 4)
    t = grid_tokens([16, 16], 4, D=4, seed=2, full=True, signals=signals_for(op))
    t.x[1, 5, 2] = float("nan")
    with pytest.raises(InputError, match=f"'{name}'"):
        op(t)


@pytest.mark.parametrize("name", [n for n in OPS if make_op(n, 4, 4).requires])
def test_missing_signals_name_op_signal_and_layer(name):
    op = make_op(name, 4, 4)
    for sig, layers in op.requires.items():
        full = grid_tokens([16], 4, D=4, seed=3, full=True, signals=signals_for(op))
        signals = {s: dict(v) for s, v in full.signals.items()}
        last = CLIP_L.resolve_all(layers)[-1]
        del signals[sig][last]
        with pytest.raises(SignalError) as e:
            op(full.replace(signals=signals))
        msg = str(e.value)
        assert f"'{name}'" in msg and f"'{sig}'" in msg and f"layer {last}" in msg


@pytest.mark.parametrize("name", OPS)
def test_config_round_trips(name):
    op = make_op(name, 4, 4)
    p = vtc.build(op)
    assert vtc.build(p.spec()) == p == vtc.build(str(p))
    assert op.stage in ("vision", "llm") and isinstance(op.requires, dict)
    assert len(p.hash) == 12 and int(p.hash, 16) >= 0


# ---------------------------------------------------------------------- every budget form, merged inputs
def budget_forms(name: str) -> list[str]:
    """The ways operator ``name`` takes a budget: ``keep``/``ratio`` where its config has them, plus
    pool's ``grid`` and tome's ``r``."""
    fields = {f.name for f in dataclasses.fields(get_op(name).Config)}
    forms = [f for f in ("keep", "ratio", "grid", "r") if f in fields]
    return forms or ["default"]


def form_args(name: str, form: str, draw, h: int, parts: int) -> dict:
    if form == "keep":
        k = draw(st.integers(1, parts * h * h + 3))
        return _m3_args(k, h, parts) if name == "m3" else {"keep": k}
    if form == "ratio":
        return {"ratio": draw(st.sampled_from([1.0, 0.5, 0.25, 0.098]) | st.floats(0.01, 1.0))}
    if form == "grid":
        return {"grid": [draw(st.integers(1, h + 1)), draw(st.integers(1, h + 1))]}
    if form == "r":
        return {"r": draw(st.integers(1, parts * h * h))}
    return {}


def limits(name: str, op, t, args: dict, h: int, parts: int, anyres: bool) -> list[tuple[int, int]]:
    """Per image ``(fewest, most)`` tokens the operator may return under ``args``."""
    out = []
    for b in range(t.batch_size):
        n = int(t.counts[b])
        present = len(set(rows(t, b)["group"].tolist()))
        lo, hi = 1, n
        if name == "m3":
            hi = n  # checked per partition by check_invariants
        elif "grid" in args:
            hi = min(n, args["grid"][0] * args["grid"][1] * present)
        elif "r" in args and not ({"keep", "ratio"} & set(args)):
            lo, hi = max(n - args["r"], 1), n
        elif name == "hired":
            total = args.get("keep", None)
            if total is None:
                ratio = args.get("ratio", 0.2)
                total = int((parts * h * h if anyres else n) * ratio)
            hi = min(max(total, 1), n)
        elif name == "globalcom2":
            ratio = args.get("ratio", 0.25)
            hi = min(max(math.floor((parts * h * h if anyres else n) * ratio) + (parts - 1 if anyres else 0), 1), n)
        elif "keep" in args:
            hi = min(args["keep"], n)
        elif "ratio" in args:
            hi = min(max(1, round(args["ratio"] * n)), n)
        if name == "tome" and ("keep" in args or "ratio" in args):
            lo = hi  # tome merges exactly down to its budget
        out.append((lo, hi))
    return out


@pytest.mark.parametrize("name", OPS)
@SETTINGS
@given(case=cases(), data=st.data())
def test_every_budget_form_and_merged_inputs(name, case, data):
    """Each budget form (keep=, ratio=, pool's grid=, tome's r=) on raw or already merged tokens: at
    most the budget, at least one token, every field aligned, deterministic, a batch equals each image
    alone. Merged inputs come from ``tome`` (sizes > 1, summed attention, scrambled order)."""
    cls = get_op(name)
    h, parts = case["h"], case["parts"]
    anyres = cls.allocates and parts > 1
    form = data.draw(st.sampled_from(budget_forms(name)), label="form")
    args = form_args(name, form, data.draw, h, parts)
    op = vtc.create(name, **{**FIXED.get(name, {}), **args})
    t = _tokens(dict(case, budget=None), op)
    premerge = not cls.allocates and data.draw(st.booleans(), label="premerge")
    if premerge:
        t = vtc.create("tome", ratio=data.draw(st.floats(0.3, 1.0), label="premerge ratio"))(t)
    try:
        out = op(t)
    except BudgetError as e:  # pool keeps a token per partition; tome keeps its protected CLS
        assert name == "pool" and "per partition" in str(e), e
        return
    case = dict(case, budget=None, limits=limits(name, op, t, args, h, parts, anyres))
    check_invariants(name, op, t, out, case)
    _same(out, op(t), atol=0)
    for b in range(t.batch_size):
        _same(image(out, b), op(image(t, b)))
