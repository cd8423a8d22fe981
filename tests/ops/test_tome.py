"""ToMe (vtc/ops/tome.py) against a brute-force fp64 re-implementation of methods.md §6."""

import math

import numpy as np
import pytest
import torch
from _ops_testlib import CLIP_L, assert_batch_equals_alone, grid_tokens, np64, partition_budget_check

import vtc
from vtc import VisualTokens
from vtc.errors import BudgetError, InputError, SignalError


# ---------------------------------------------------------------------- reference
def _tokens_as_list(t: VisualTokens, b: int, metric: str | None):
    """Image b as a list of plain-python tokens."""
    n = int(t.counts[b])
    out = []
    for i in range(n):
        out.append({
            "x": np64(t.x[b, i]),
            "m": np64(t.x[b, i] if metric is None else t.signals["keys"][metric][b, i]),
            "size": float(t.sizes[b, i]),
            "index": int(t.index[b, i]),
            "first": int(t.index[b, i]),
            "attn": float(t.signals["cls_attn"][22][b, i]) if "cls_attn" in t.signals else 0.0,
        })
    return out


def ref_step(tok, r, protect):
    """One bipartite soft-matching step: A = even positions, B = odd; cosine of the metric; the r A
    tokens with the highest best-match merge (size-weighted) into their best B; output [unm A, B]."""
    A, B = tok[0::2], tok[1::2]

    def unit(v):
        return v / math.sqrt(float(v @ v))

    S = [[float(unit(a["m"]) @ unit(b["m"])) for b in B] for a in A]
    if protect:
        S[0] = [-math.inf] * len(B)
    best = [max(row) for row in S]
    dst = [row.index(max(row)) for row in S]  # first maximum
    order = sorted(range(len(A)), key=lambda i: (-best[i], i))  # argsort, descending
    src, unm = order[:r], order[r:]
    if protect:
        unm = sorted(unm)
    out = [dict(A[i]) for i in unm]
    for j, b in enumerate(B):
        members = [b] + [A[i] for i in src if dst[i] == j]
        s = sum(m["size"] for m in members)
        out.append({
            "x": sum(m["size"] * m["x"] for m in members) / s,
            "m": sum(m["size"] * m["m"] for m in members) / s,
            "size": s,
            "index": b["index"],
            "first": min(m["first"] for m in members),
            "attn": sum(m["attn"] for m in members),
        })
    return out


def ref_tome(tok, keep, *, r=None, protect=False, clean=False, one_step=False):
    while True:
        n = len(tok)
        step = min(n - keep, (n - int(protect)) // 2)
        if r is not None:
            step = min(step, r)
        if step <= 0:
            break
        tok = ref_step(tok, step, protect)
        if one_step:
            break
    if clean:
        tok = sorted(tok, key=lambda t: t["first"])
        tok = [dict(t, index=t["first"]) for t in tok]
    return tok


def assert_matches(out: VisualTokens, b: int, ref, *, attn=False):
    n = int(out.counts[b])
    assert n == len(ref)
    assert out.index[b, :n].tolist() == [t["index"] for t in ref]
    np.testing.assert_allclose(np64(out.x[b, :n]), np.stack([t["x"] for t in ref]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np64(out.sizes[b, :n]), [t["size"] for t in ref], rtol=1e-12)
    if attn:
        np.testing.assert_allclose(np64(out.signals["cls_attn"][22][b, :n]), [t["attn"] for t in ref], rtol=1e-12)


def _op(keep=None, **kw):
    return vtc.create("tome", **kw) if keep is None else vtc.create("tome", keep=keep, **kw)


# ---------------------------------------------------------------------- exact sequences
@pytest.mark.parametrize("seed, N, r", [(0, 20, 5), (1, 21, 10), (2, 9, 1)])
def test_one_step_with_r(seed, N, r):
    t = grid_tokens([N], 6, D=5, seed=seed)
    out = _op(r=r)(t)
    ref = ref_tome(_tokens_as_list(t, 0, None), N - r, r=r, one_step=True)
    assert_matches(out, 0, ref)


def test_unm_then_dst_layout():
    """After one step: the unmerged A tokens (even positions) first, then every B token (odd positions)
    in its original order."""
    t = grid_tokens([16], 4, D=4, seed=3, full=True)
    out = _op(r=3)(t)
    idx = out.index[0].tolist()
    assert len(idx) == 13
    assert all(i % 2 == 0 for i in idx[:5]) and idx[5:] == list(range(1, 16, 2))
    ref = ref_tome(_tokens_as_list(t, 0, None), 13, r=3, one_step=True)
    assert idx[:5] == [t["index"] for t in ref[:5]]


@pytest.mark.parametrize("seed, N, keep", [(4, 40, 7), (5, 33, 16), (6, 12, 1)])
def test_iterated_to_keep_on_keys(seed, N, keep):
    t = grid_tokens([N], 7, D=6, seed=seed, signals={"keys": ([20, 22], 5), "cls_attn": ([22], None)})
    out = _op(keep)(t)  # metric auto: keys of the highest recorded layer
    ref = ref_tome(_tokens_as_list(t, 0, 22), keep)
    assert_matches(out, 0, ref, attn=True)
    np.testing.assert_allclose(np64(out.signals["keys"][22][0]), np.stack([t["m"] for t in ref]), rtol=1e-12)


def test_metric_choice():
    t = grid_tokens([30], 6, D=6, seed=7, signals={"keys": ([20, 22], 5)})
    on_x = ref_tome(_tokens_as_list(t, 0, None), 10)
    assert_matches(_op(10, metric="x")(t), 0, on_x)
    assert_matches(_op(10, metric="keys", layer=20)(t), 0, ref_tome(_tokens_as_list(t, 0, 20), 10))
    assert_matches(_op(10, layer=20)(t), 0, ref_tome(_tokens_as_list(t, 0, 20), 10))
    assert_matches(_op(10, metric="keys")(t), 0, ref_tome(_tokens_as_list(t, 0, 22), 10))
    plain = VisualTokens(x=t.x, index=t.index, layout=t.layout)
    assert_matches(_op(10)(plain), 0, on_x)  # auto without keys: features
    assert _op(3, metric="keys").requires == {"keys": ["feature"]} and _op(3).requires == {}
    assert CLIP_L.resolve("feature") == 22
    assert _op(3, metric="keys", layer=23).requires == {"keys": [23]}


def test_size_weights_from_earlier_merges():
    t = grid_tokens([36], 6, D=4, seed=8, size=True, full=True)
    out = _op(8)(t)
    assert_matches(out, 0, ref_tome(_tokens_as_list(t, 0, None), 8))
    torch.testing.assert_close(out.size.sum(1), t.size.sum(1))


def test_r_per_step():
    t = grid_tokens([40], 7, D=5, seed=9)
    out = _op(10, r=3)(t)
    assert_matches(out, 0, ref_tome(_tokens_as_list(t, 0, None), 10, r=3))
    # r larger than half the tokens is capped at half per step
    assert_matches(_op(4, r=100)(t), 0, ref_tome(_tokens_as_list(t, 0, None), 4))
    # r alone: one step of r merges
    assert _op(r=7)(t).counts.tolist() == [33]


@pytest.mark.parametrize("N, keep", [(31, 10), (30, 3), (10, 2)])
def test_protect_cls(N, keep):
    t = grid_tokens([N], 6, D=5, seed=10, full=False, signals={"cls_attn": ([22], None)})
    out = _op(keep, protect_cls=True)(t)
    ref = ref_tome(_tokens_as_list(t, 0, None), keep, protect=True)
    assert_matches(out, 0, ref, attn=True)
    assert out.index[0, 0] == t.index[0, 0] and out.size[0, 0] == 1  # the CLS token is never merged
    torch.testing.assert_close(out.x[0, 0], t.x[0, 0], rtol=0, atol=0)


def test_protect_cls_cannot_go_below_two_tokens():
    t = grid_tokens([9], 3, seed=11)
    with pytest.raises(BudgetError, match="protect_cls"):
        _op(1, protect_cls=True)(t)


@pytest.mark.parametrize("form", [dict(compat="clean"), dict(restore_order=True)])
def test_restore_order(form):
    t = grid_tokens([30], 6, D=5, seed=12, signals={"keys": ([22], 4)})
    out = _op(9, **form)(t)
    ref = ref_tome(_tokens_as_list(t, 0, 22), 9, clean=True)
    assert_matches(out, 0, ref)
    assert out.index[0].tolist() == sorted(out.index[0].tolist())
    assert set(out.signals) == {"keys"}  # the private bookkeeping signal is gone


def test_official_order_is_not_raster():
    t = grid_tokens([30], 6, D=5, seed=12)
    idx = _op(9)(t).index[0].tolist()
    assert idx != sorted(idx)


# ---------------------------------------------------------------------- batches, budgets, edges
def test_batch_of_three_with_variable_counts_equals_each_alone():
    t = grid_tokens([30, 11, 25], 6, D=5, seed=13, size=True,
                    signals={"keys": ([22], 4), "cls_attn": ([22], None)})
    out = assert_batch_equals_alone(_op(8), t, rtol=1e-12, atol=1e-12)
    assert out.counts.tolist() == [8, 8, 8]
    for b in range(3):
        assert_matches(out, b, ref_tome(_tokens_as_list(t, b, 22), 8), attn=True)
    for form in (dict(compat="clean"), dict(protect_cls=True), dict(r=2)):
        assert_batch_equals_alone(_op(8, **form), t, rtol=1e-12, atol=1e-12)


def test_merges_preserve_size_and_attention_mass():
    t = grid_tokens([30, 20], 6, D=5, seed=14, size=True, signals={"cls_attn": ([16, 22], None)})
    out = _op(5)(t)
    torch.testing.assert_close(out.size.sum(1), t.size.sum(1))
    for l in (16, 22):
        torch.testing.assert_close(out.signals["cls_attn"][l].sum(1), t.signals["cls_attn"][l].sum(1))


def test_deterministic():
    t = grid_tokens([30, 20], 6, seed=15)
    a, b = _op(6)(t), _op(6)(t)
    assert torch.equal(a.index, b.index) and torch.equal(a.x, b.x)


def test_edge_budgets():
    t = grid_tokens([20], 5, seed=16)
    one = _op(1)(t)
    assert one.counts.tolist() == [1] and one.size.tolist() == [[20.0]]
    assert_matches(one, 0, ref_tome(_tokens_as_list(t, 0, None), 1))
    assert _op(20)(t) is t and _op(25)(t) is t


def test_per_partition_budgets():
    t = grid_tokens([40, 33], 5, D=5, seed=17, parts=3, signals={"cls_attn": ([22], None)})
    partition_budget_check(_op, t, torch.tensor([[3, 0, 25], [1, 6, 0]]), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- errors
def test_missing_keys_name_op_signal_and_layer():
    t = grid_tokens([10], 4, seed=18)
    with pytest.raises(SignalError) as e:
        _op(3, metric="keys")(t)
    assert "'tome'" in str(e.value) and "'keys'" in str(e.value) and "layer 22" in str(e.value)
    t2 = grid_tokens([10], 4, seed=18, signals={"keys": ([22], 3)})
    with pytest.raises(SignalError, match="layer 5"):
        _op(3, layer=5)(t2)


def test_non_finite_features_raise():
    t = grid_tokens([10], 4, seed=19)
    t.x[0, 4, 1] = float("nan")
    with pytest.raises(InputError, match="'tome'"):
        _op(3)(t)


def test_config_defaults():
    op = _op(3)
    assert op.stage == "vision" and op.config.compat == "official" and not op.config.restore_order
    assert not op.config.protect_cls and op.config.metric == "auto"


def test_merges_stay_inside_partitions():
    """Tokens of different partitions never merge, even when they are the most similar pairs."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(12, 6, generator=g, dtype=torch.float64)
    # partition 1 repeats partition 0 up to tiny noise: every cross-partition pair is a near-duplicate
    x = torch.cat([base, base + 1e-6 * torch.randn(12, 6, generator=g, dtype=torch.float64)]).unsqueeze(0)
    group = torch.tensor([[0] * 12 + [1] * 12])
    for compat in ("official", "clean"):
        out = vtc.create("tome", keep=6, compat=compat)(VisualTokens(x=x, group=group))
        assert out.counts.tolist() == [6]
        for p in (0, 1):
            assert float(out.size[out.group == p].sum()) == 12.0  # every member came from partition p
        idx, grp = out.index[0], out.group[0]
        assert bool(((idx < 12) == (grp == 0)).all())


@pytest.mark.parametrize("compat", ["official", "clean"])
def test_below_one_token_per_partition_merges_across(compat):
    """Same-partition pairs go first; only then do merges cross partitions, index and group consistent."""
    x = torch.randn(1, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    group = torch.tensor([[0, 0, 1, 1, 2, 2]])
    t = VisualTokens(x=x, group=group)
    three = vtc.create("tome", keep=3, compat=compat)(t)
    assert sorted(three.group[0].tolist()) == [0, 1, 2] and three.size[0].tolist() == [2.0, 2.0, 2.0]
    two = vtc.create("tome", keep=2, compat=compat)(t)
    assert two.counts.tolist() == [2] and float(two.size.sum()) == 6.0
    assert torch.equal(two.group[0], two.index[0] // 2)  # each token's partition is its index's


def official_tome_step(x: torch.Tensor, r: int, stable: bool = False):
    """ToMe's batched bipartite soft matching in ``x``'s own dtype (metric = features), as in its
    official code: ``argsort(descending=True)`` with torch's default tie order. Returns per image
    the output's original indices ``[unmerged A, B]`` and each B token's merged size."""
    m = x / x.norm(dim=-1, keepdim=True)
    node_max, node_idx = (m[:, ::2] @ m[:, 1::2].transpose(-1, -2)).max(dim=-1)
    edge = torch.sort(node_max, dim=-1, descending=True, stable=stable).indices if stable else \
        node_max.argsort(dim=-1, descending=True)
    out = []
    for b in range(x.shape[0]):
        unm, src = edge[b, r:], edge[b, :r]
        sizes = [1] * (x.shape[1] // 2)
        for i in src.tolist():
            sizes[int(node_idx[b, i])] += 1
        out.append(([2 * i for i in unm.tolist()] + list(range(1, x.shape[1], 2)), [1] * len(unm) + sizes))
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_official_half_precision_step_matches_tomes_order_of_operations(dtype):
    g = torch.Generator().manual_seed(21)
    differs = 0
    for B, N, r in ((2, 400, 150), (3, 576, 288), (1, 200, 37)):
        x = (0.2 * torch.randn(B, N, 16, generator=g) + torch.randn(B, 1, 16, generator=g)).to(dtype)
        out = _op(r=r)(VisualTokens(x=x))
        for b, (index, sizes) in enumerate(official_tome_step(x, r)):
            assert out.index[b].tolist() == index
            assert out.size[b].tolist() == sizes
        differs += [i for i, _ in official_tome_step(x, r, stable=True)] != [i for i, _ in official_tome_step(x, r)]
    assert differs > 0  # ties in half precision: a stable sort would merge other tokens


@pytest.mark.parametrize("compat", ["official", "clean"])
def test_padded_batch_keeps_tokens_without_a_partner(compat):
    """An A token with no same-partition partner (best = -inf) must keep its slot when padding A
    tokens (also -inf) share its row: torch's default (unstable) sort may order them either way."""
    t = grid_tokens([3, 33], 4, D=4, seed=0, parts=3, signals={"cls_attn": ([22], None)})
    for kw in (dict(ratio=0.5), dict(keep=1), dict(keep=2)):
        out = assert_batch_equals_alone(_op(compat=compat, **kw), t, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.size.sum(1), (t.sizes * t.valid).sum(1))
