"""In-LLM operators (fastv, pdrop, aim, sparsevlm, router) and the LayerContext signal.

Each method's kept visual tokens after every decoder layer, run batched (B=3, left padding,
different prompt and image lengths) through LayerContext.from_qk, equal a brute-force reference
that runs one sample at a time, unpadded, on the FULL eager attention map computed from the same
q/k (tests/ops/_llm_sim.py), index-exact in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch
from _llm_sim import World, eager_attention, run_batched, run_reference

import vtc
from vtc.errors import ConfigError, InputError
from vtc.ops.llm_layer import LayerContext, QKAttention

SHAPES = dict(sys=[3, 5, 2], vis=[20, 14, 24], txt=[4, 6, 3])


def _top(scores: dict, k: int) -> set:
    """The k ids with the highest score (ties: the smaller position, passed as the dict order)."""
    order = sorted(range(len(scores)), key=lambda i: (-list(scores.values())[i], i))
    keys = list(scores)
    return {keys[i] for i in order[:k]}


def _hidden(world, b, layer, seq):
    return torch.stack([world.hidden(b, layer, t) for t in seq])


def _visual(world, b, seq):
    return [i for i, t in enumerate(seq) if world.is_visual(b, t)]


def _keep(seq, vis_pos, chosen_pos):
    return [t for i, t in enumerate(seq) if i not in vis_pos or i in chosen_pos]


def _last_row_decider(world, b, count):
    """FastV / PDrop: rank by the head-mean attention of the last token's row."""
    def decide(seq, layer, state):
        A = eager_attention(world, layer, _hidden(world, b, layer, seq))
        s = A[:, -1, :].mean(0)
        vp = _visual(world, b, seq)
        chosen = _top({i: float(s[i]) for i in vp}, count(layer, len(vp)))
        return _keep(seq, vp, chosen), []
    return decide


def _compare(world, pipe, deciders, layers):
    got = run_batched(world, pipe)
    for b in range(len(world.sys)):
        want = run_reference(world, b, deciders[b], layers)
        assert got[b] == want, f"sample {b}"
    return got


# ---------------------------------------------------------------------------------------- fastv / pdrop
@pytest.mark.parametrize("K,R", [(1, 0.5), (3, 0.75), (2, 0.3)])
def test_fastv_matches_full_eager_reference(K, R):
    world = World(**SHAPES, layers=5, seed=K)
    pipe = vtc.build(f"fastv:K={K},R={R}")
    got = _compare(world, pipe, [_last_row_decider(world, b, lambda l, n: int((1 - R) * n))
                                 for b in range(3)], [K - 1])
    for b in range(3):
        counts = [len(v) for v in got[b]]
        assert counts[:K - 1] == [SHAPES["vis"][b]] * (K - 1)
        assert counts[K - 1:] == [int((1 - R) * SHAPES["vis"][b])] * (5 - K + 1)


def test_pdrop_matches_full_eager_reference():
    world = World(**SHAPES, layers=6, seed=11)
    layers, ratios = [1, 3, 4], [0.5, 0.25, 0.125]
    pipe = vtc.build(f"pdrop:layers={layers},ratios={ratios}")

    def deciders(b):
        return _last_row_decider(world, b, lambda l, n: min(n, int(ratios[layers.index(l)] * SHAPES["vis"][b])))
    got = _compare(world, pipe, [deciders(b) for b in range(3)], layers)
    assert [len(v) for v in got[2]] == [24, 12, 12, 6, 3, 3]


def test_pdrop_layers_scale_with_depth():
    op = vtc.create("pdrop")
    assert op.resolve_layers(32) == [8, 16, 24] and op.resolve_layers(28) == [7, 14, 21]
    assert op.resolve_layers(40) == [10, 20, 30] and op.resolve_layers(4) == [1, 2, 3]
    with pytest.raises(ConfigError, match="give layers="):
        op.resolve_layers(2)
    assert vtc.create("pdrop", layers=[-3, -2, -1]).resolve_layers(8) == [5, 6, 7]


# ---------------------------------------------------------------------------------------- aim
def _aim_decider(world, b, start, step):
    def decide(seq, layer, state):
        A = eager_attention(world, layer, _hidden(world, b, layer, seq), temperature=0.1)  # [H, L, L], full map
        L = len(seq)
        d = torch.full((A.shape[0], 1, L), 1.0 / L)
        for _ in range(5):
            d = d @ A
        imp = d[:, 0].pow(2).mean(0).sqrt()
        vp = _visual(world, b, seq)
        rate = max(0.0, 1 - (layer - start + 1) * step)
        k = min(len(vp), int(SHAPES["vis"][b] * rate))
        return _keep(seq, vp, _top({i: float(imp[i]) for i in vp}, k)), []
    return decide


def test_aim_pagerank_matches_full_eager_reference():
    world = World(**SHAPES, layers=7, seed=5)
    pipe = vtc.build("aim:start=2,step=0.25")
    assert pipe[0].resolve_layers(7) == [2, 3, 4, 5]
    got = _compare(world, pipe, [_aim_decider(world, b, 2, 0.25) for b in range(3)], [2, 3, 4, 5])
    assert [len(v) for v in got[0]] == [20, 20, 15, 10, 5, 0, 0]


def test_aim_schedules():
    vic, qwen = vtc.create("aim"), vtc.create("aim", schedule="qwen2")
    assert vic.resolve_layers(32) == list(range(13, 21))
    assert [vic.rate(l, 32) for l in (13, 16, 20)] == [0.875, 0.5, 0.0]
    assert qwen.resolve_layers(28) == list(range(14, 22)) and qwen.rate(14, 28) == 0.875
    with pytest.raises(ConfigError, match="set start="):
        vic.resolve_layers(8)
    n = torch.tensor([576])
    assert [int(vic.kept_visual(l, n, n, 32)) for l in range(13, 21)] == [504, 432, 360, 288, 216, 144, 72, 0]


# ---------------------------------------------------------------------------------------- sparsevlm
def _dpc(x: torch.Tensor, c: int) -> tuple[list[int], list[int]]:
    """Brute-force DPC-kNN: centres (by descending dist*density, ties first) and each point's cluster."""
    M, D = x.shape
    dist = [[float((x[i] - x[j]).pow(2).sum().sqrt()) / math.sqrt(D) for j in range(M)] for i in range(M)]
    dens = []
    for i in range(M):
        near = sorted(dist[i])[:c]
        dens.append(math.exp(-sum(v * v for v in near) / c))
    dmax = max(max(r) for r in dist)
    par = []
    for i in range(M):
        higher = [dist[i][j] for j in range(M) if dens[j] > dens[i]]
        par.append(min(higher) if higher else dmax)
    score = [par[i] * dens[i] for i in range(M)]
    centres = sorted(range(M), key=lambda i: (-score[i], i))[:c]
    assign = []
    for i in range(M):
        if i in centres:
            assign.append(centres.index(i))
        else:
            dc = [dist[i][j] for j in centres]
            assign.append(dc.index(min(dc)))
    return centres, assign


def _sparsevlm_decider(world, b, layers, counts):
    def decide(seq, layer, state):
        vp = _visual(world, b, seq)
        if "raters" not in state:  # text after the image, from the input embeddings
            e = torch.stack([world.embed(b, t) for t in seq])
            tp = [i for i in range(vp[-1] + 1, len(seq))]
            P = torch.softmax(e[vp] @ e[tp].T, dim=-1).mean(0)
            state["raters"] = [seq[tp[j]] for j in range(len(tp)) if float(P[j]) > float(P.mean())] or [seq[i] for i in tp]
        rows = [seq.index(t) for t in state["raters"]]
        A = eager_attention(world, layer, _hidden(world, b, layer, seq)).mean(0)
        s = A[rows].mean(0)
        n = counts[layers.index(layer)]
        scores = {i: float(s[i]) for i in vp}
        chosen = _top(scores, min(n, len(vp)))
        kept = _keep(seq, vp, chosen)
        dropped = [i for i in vp if i not in chosen]
        if not dropped:
            return kept, []
        m = int(0.3 * len(dropped)) + 1
        rec = sorted(dropped, key=lambda i: (-scores[i], i))[:m]
        c = m // 10 + 1
        x = torch.stack([world.hidden(b, layer, seq[i]) for i in rec])
        centres, assign = _dpc(x, c)
        added = []
        for j, ci in enumerate(centres):
            members = [i for i in range(m) if assign[i] == j]
            added.append(([seq[rec[i]] for i in members], seq[rec[ci]], x[members].mean(0)))
        return kept, added
    return decide


def test_sparsevlm_matches_full_eager_reference_with_recycling():
    shapes = dict(sys=[3, 5, 2], vis=[70, 48, 80], txt=[4, 6, 3])
    world = World(**shapes, layers=6, seed=7)
    layers, counts = [1, 2, 4], [20, 12, 5]
    pipe = vtc.build(f"sparsevlm:layers={layers},counts={counts}")
    got = run_batched(world, pipe)
    for b in range(3):
        assert got[b] == run_reference(world, b, _sparsevlm_decider(world, b, layers, counts), layers), f"sample {b}"
    # sample 2: 80 -> 20 kept + 2 clusters of int(0.3*60)+1 = 19 recycled -> 22; -> 12 + 1 -> 13; -> 5 + 1 -> 6
    assert [len(v) for v in got[2]] == [80, 22, 13, 13, 6, 6]
    assert sum(isinstance(t, tuple) for t in got[2][1]) == 2
    op = pipe[0]
    assert [int(op.kept_visual(l, torch.tensor([n]), torch.tensor([80]), 6)) for l, n in zip(layers, (80, 22, 13))] \
        == [22, 13, 6]


def test_dpc_knn_matches_brute_force():
    from vtc.ops.sparsevlm import dpc_knn

    g = torch.Generator().manual_seed(0)
    sizes, clusters = [23, 9, 31], [3, 1, 4]
    x = torch.randn(3, 31, 5, generator=g)
    valid = torch.arange(31).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)
    centres, assign = dpc_knn(x, valid, torch.tensor(clusters))
    for b, (n, c) in enumerate(zip(sizes, clusters)):
        want_c, want_a = _dpc(x[b, :n], c)
        assert centres[b, :c].tolist() == want_c and assign[b, :n].tolist() == want_a


def test_sparsevlm_presets_and_counts():
    op = vtc.create("sparsevlm")
    assert op.resolve_layers(32) == [2, 6, 15] and op.position_ids == "contiguous"
    n = torch.tensor([576])
    alive = n
    seen = []
    for l in op.resolve_layers(32):
        alive = op.kept_visual(l, alive, n, 32)
        seen.append(int(alive))
    # 576 -> 300 kept + int((int(0.3*276)+1)/10)+1 = 9 clusters; 309 -> 200 + 4; 204 -> 110 + 3
    assert seen == [309, 204, 113]
    assert [int(vtc.create("sparsevlm", retain=r).target(2, n, 32)) for r in (192, 128, 96, 64)] == [300, 303, 238, 66]
    assert int(vtc.create("sparsevlm", retain=64).target(15, torch.tensor([2880]), 32)) == 17 * 2880 // 576
    with pytest.raises(ConfigError, match="presets"):
        vtc.create("sparsevlm", retain=100)
    no_rec = vtc.create("sparsevlm", recycle=False)
    assert int(no_rec.kept_visual(2, n, n, 32)) == 300


# ---------------------------------------------------------------------------------------- no-ops, router
@pytest.mark.parametrize("spec", ["fastv:R=0", "pdrop:layers=[1,2,3],ratios=[1.0,1.0,1.0]", "aim:start=1,step=0",
                                  "sparsevlm:layers=[1,2,3],counts=[99,99,99]"])
def test_no_pruning_keeps_everything(spec):
    world = World(**SHAPES, layers=5, seed=3)
    got = run_batched(world, vtc.build(spec))
    for b in range(3):
        assert all(v == list(range(SHAPES["sys"][b], SHAPES["sys"][b] + SHAPES["vis"][b])) for v in got[b])


def test_router_is_a_learned_layer_operator_without_attention():
    op = vtc.create("router", dim=16, layers=[2], ratios=[0.25])
    assert op.needs_attention is False and len(list(op.parameters())) == 2
    world = World(**SHAPES, layers=4, seed=2)
    got = run_batched(world, vtc.build(op))
    # zero-initialised router: every score ties, the earliest visual tokens stay
    assert got[0][2] == list(range(3, 3 + 5)) and got[1][3] == list(range(5, 5 + 3))
    with torch.no_grad():
        op.routers[0].weight.normal_(generator=torch.Generator().manual_seed(0))
    h = world.hid[0, 2]
    s = (h @ op.routers[0].weight[0]).tolist()
    vis = list(range(3, 23))
    want = sorted(sorted(vis, key=lambda i: (-s[i], i))[:5])
    assert run_batched(world, vtc.build(op))[0][2] == want
    ctx = LayerContext.from_qk(None, None, layer=2, num_layers=4, hidden=torch.randn(1, 6, 16),
                               visual=torch.tensor([[False, True, True, True, True, False]]))
    fresh = vtc.create("router", dim=16, layers=[2], ratios=[0.25])
    assert fresh(ctx).tolist() == [[True, True, False, False, False, True]]
    with pytest.raises(ConfigError, match="dim="):
        vtc.create("router")


# ---------------------------------------------------------------------------------------- signal and contract
def test_attention_rows_equal_the_full_eager_map_with_padding_and_gqa():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, d = 3, 6, 2, 9, 4
    q, k = torch.randn(B, H, L, d, generator=g), torch.randn(B, Hkv, L, d, generator=g)
    pad = [0, 3, 5]
    valid = torch.arange(L).unsqueeze(0) >= torch.tensor(pad).unsqueeze(1)
    att = QKAttention(q, k, 0.37, valid)
    rows = torch.tensor([[8, 2, -1], [8, 4, 3], [6, 7, -1]])
    for temp in (1.0, 0.1):
        got = att.rows(rows, temp)
        for b in range(B):
            p = pad[b]
            kk = k[b, :, p:].repeat_interleave(H // Hkv, 0)
            full = (q[b, :, p:] @ kk.transpose(1, 2)) * 0.37 / temp
            n = L - p
            full = torch.softmax(full.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")), -1)
            for r in range(3):
                pos = int(rows[b, r])
                if pos < p:  # -1 or padding: zeros
                    assert bool((got[b, :, r] == 0).all())
                    continue
                torch.testing.assert_close(got[b, :, r, p:], full[:, pos - p], rtol=1e-6, atol=1e-7)
                assert bool((got[b, :, r, :p] == 0).all())
    cols = torch.tensor([[0, 8], [4, -1], [6, 7]])
    blk = att.block(rows, cols)
    full_rows = att.rows(rows)
    for b in range(B):
        for c in range(2):
            if cols[b, c] >= 0:
                assert torch.equal(blk[b, :, :, c], full_rows[b, :, :, cols[b, c]])
            else:
                assert bool((blk[b, :, :, c] == 0).all())


def test_context_and_operator_errors():
    hidden = torch.randn(2, 5, 4)
    visual = torch.tensor([[False, True, True, False, False]] * 2)
    with pytest.raises(InputError, match="bool"):
        LayerContext.from_qk(None, None, layer=0, num_layers=2, hidden=hidden, visual=visual.long())
    ctx = LayerContext.from_qk(None, None, layer=1, num_layers=2, hidden=hidden, visual=visual)
    op = vtc.create("fastv", K=2)
    with pytest.raises(InputError, match="no q/k"):
        op(ctx)
    with pytest.raises(InputError, match="does not run after decoder layer 0"):
        op(LayerContext.from_qk(None, None, layer=0, num_layers=2, hidden=hidden, visual=visual))
    with pytest.raises(ConfigError, match="LayerContext"):
        op(vtc.VisualTokens(x=torch.randn(1, 4, 3)))
    with pytest.raises(ConfigError, match="K="):
        vtc.create("fastv", layers=[1])
    with pytest.raises(ConfigError, match="does not exist"):
        vtc.create("pdrop", layers=[1, 2, 40]).resolve_layers(32)
    with pytest.raises(ConfigError, match="cannot run at stage"):
        vtc.create("fastv", stage="llm")
    with pytest.raises(ConfigError, match="cannot run at stage"):
        vtc.create("divprune", keep=4, stage="llm_layer")


def test_pipeline_stages_and_schedule():
    p = vtc.build("tome:keep=288 | fastv:K=3 | pdrop")
    assert [op.stage for op in p] == ["vision", "llm_layer", "llm_layer"]
    sched = p.layer_schedule(32)
    assert {l: [op.name for op in ops] for l, ops in sched.items()} == {2: ["fastv"], 8: ["pdrop"], 16: ["pdrop"],
                                                                        24: ["pdrop"]}
    with pytest.raises(ConfigError, match="come after every other operator"):
        vtc.build("fastv | divprune:keep=64")
    t = vtc.VisualTokens(x=torch.randn(1, 16, 4))
    out = p(t)  # runs the pre-LLM part only
    assert out.counts.tolist() == [16]
    with pytest.raises(ConfigError, match="layer_schedule"):
        p(t, stage="llm_layer")
    assert vtc.build(p.spec()) == p == vtc.build(str(p))
    for name in ("fastv", "pdrop", "aim", "sparsevlm"):
        op = vtc.create(name)
        assert op.stage == "llm_layer" and op.requires == {} and vtc.build(str(vtc.build(op))) == vtc.build(op)


@pytest.mark.parametrize("spec", [
    "fastv:K=2,R=0.6",
    "pdrop:layers=[0,2,4],ratios=[0.7,0.3,0.05]",
    "aim:start=1,step=0.3",
    "sparsevlm:layers=[0,1,3],counts=[30,11,2]",
    "sparsevlm:layers=[1,2,3],retain=64",
    "router:dim=16,layers=[1,3],ratios=[0.5,0.2]",
    "fastv:K=1,R=0.5 | pdrop:layers=[2,3,4],ratios=[0.4,0.2,0.1] | aim:start=4,step=0.5",
])
def test_decisions_follow_the_counting_rule_the_flops_model_uses(spec):
    """Property: after every layer each sample holds exactly the visual tokens kept_visual predicts (what
    vtc.bench.flops counts), text is never dropped (run_batched asserts it), and a batch decides as
    each sample alone (by the reference runs of the other tests, and here by counts per sample)."""
    from vtc.bench.flops import layer_visual_counts

    shapes = dict(sys=[2, 6, 4, 1], vis=[40, 17, 64, 33], txt=[5, 2, 8, 3])
    pipe = vtc.build(spec)
    world = World(**shapes, layers=6, seed=13)
    got = run_batched(world, pipe)
    for b, n in enumerate(shapes["vis"]):
        counts = layer_visual_counts(pipe, n, 6)
        assert [len(v) for v in got[b][:-1]] == counts[1:]  # got[b][l]: after layer l; counts[l]: entering layer l
        ids = [t for t in got[b][-1] if not isinstance(t, tuple)]
        assert len(set(ids)) == len(ids) and all(shapes["sys"][b] <= t < shapes["sys"][b] + n for t in ids)
