"""mqt: shapes, nesting (first m queries), positional-only keys, masks, weights files, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.errors import BudgetError, ConfigError, LayoutError, VtcError
from vtc.ops.mqt import MQT, MQTProjector, sample_nested_m, sincos_2d

DIM, OUT, HEADS, Q = 16, 24, 4, 16


def make(keep=None):
    torch.manual_seed(1)
    return vtc.create("mqt", keep=keep, weights=None, dim=DIM, out_dim=OUT, heads=HEADS, queries=Q)


def reference(p: MQTProjector, x: torch.Tensor, m: int, grid: int) -> torch.Tensor:
    """Brute force: per head softmax(q k^T / sqrt(d)) v with explicit LayerNorms and projections."""
    D, H = p.dim, p.heads
    dh = D // H

    def ln(t, mod):
        return F.layer_norm(t, (D,), mod.weight, mod.bias, 1e-6)

    # key positions: the sqrt(Q) x sqrt(Q) table resized bicubically to grid x grid
    tab = p.pos.reshape(1, p.side, p.side, D).permute(0, 3, 1, 2)
    kpos = F.interpolate(tab, size=(grid, grid), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(-1, D)
    Wq, Wk, Wv = p.attn.in_proj_weight.split(D)
    bq, bk, bv = p.attn.in_proj_bias.split(D)
    outs = []
    for b in range(x.shape[0]):
        q = ln(p.query[:m] + p.pos[:m], p.ln_q) @ Wq.T + bq
        k = ln(kpos, p.ln_k) @ Wk.T + bk
        v = ln(x[b], p.ln_v) @ Wv.T + bv
        heads = []
        for h in range(H):
            s = slice(h * dh, (h + 1) * dh)
            a = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(dh), -1)
            heads.append(a @ v[:, s])
        o = torch.cat(heads, 1) @ p.attn.out_proj.weight.T + p.attn.out_proj.bias
        outs.append(o @ p.proj)
    return torch.stack(outs)


def test_sincos_table_matches_the_formula():
    t = sincos_2d(8, 3, 4)
    assert t.shape == (12, 8)
    for r in range(3):
        for c in range(4):
            row = t[r * 4 + c]
            for j in range(2):
                w = 1 / 10000 ** (j / 2)
                assert row[j] == pytest.approx(math.sin(c * w), abs=1e-6)  # first half: column
                assert row[2 + j] == pytest.approx(math.cos(c * w), abs=1e-6)
                assert row[4 + j] == pytest.approx(math.sin(r * w), abs=1e-6)  # second half: row
                assert row[6 + j] == pytest.approx(math.cos(r * w), abs=1e-6)


def test_forward_equals_brute_force_and_shapes():
    op = make(keep=6)
    x = torch.randn(2, 36, DIM, dtype=torch.float64)
    op.projector.double()
    out = op(vtc.VisualTokens(x=x, layout=vtc.Layout.grid(6)))
    assert out.x.shape == (2, 6, OUT)
    assert torch.equal(out.index, torch.arange(6).expand(2, 6))
    assert torch.allclose(out.size, torch.full((2, 6), 36 / 6, dtype=out.size.dtype))
    assert out.mask is None and out.group is None and out.signals == {}
    ref = reference(op.projector, x, 6, 6)
    assert torch.allclose(out.x, ref, atol=1e-10)


def test_first_m_queries_are_nested():
    big, small = make(keep=Q), make(keep=5)
    small.load_state_dict(big.state_dict())
    t = vtc.VisualTokens(x=torch.randn(3, 64, DIM), layout=vtc.Layout.grid(8))
    a, b = big(t).x, small(t).x
    assert torch.allclose(a[:, :5], b, atol=1e-6)


def test_keys_are_positional_only_official_quirk():
    # attention weights do not depend on the image: each output is a fixed pooling of LN(x) per head,
    # so permuting the features of two images in the batch permutes the outputs exactly
    op = make(keep=4)
    x = torch.randn(2, 36, DIM)
    o1 = op(vtc.VisualTokens(x=x, layout=vtc.Layout.grid(6))).x
    o2 = op(vtc.VisualTokens(x=x.flip(0), layout=vtc.Layout.grid(6))).x
    assert torch.allclose(o1.flip(0), o2, atol=1e-6)
    # and scaling an image's features leaves the output unchanged (LN on values, keys independent)
    o3 = op(vtc.VisualTokens(x=3 * x, layout=vtc.Layout.grid(6))).x
    assert torch.allclose(o1, o3, atol=1e-4)


def test_pruned_tokens_are_absent_keys():
    # an image whose tokens were pruned (mask) equals the same image given only its kept tokens
    op = make(keep=4)
    x = torch.randn(1, 36, DIM)
    keep = torch.tensor([0, 3, 5, 17, 30, 35])
    sub = vtc.VisualTokens(x=x[:, keep], index=keep[None], layout=vtc.Layout.grid(6))
    padded = vtc.VisualTokens(x=torch.cat([x[:, keep], torch.randn(1, 4, DIM)], 1),
                              index=torch.cat([keep, torch.zeros(4, dtype=torch.long)])[None],
                              mask=torch.tensor([[True] * 6 + [False] * 4]), layout=vtc.Layout.grid(6))
    a, b = op(sub), op(padded)
    assert torch.allclose(a.x, b.x, atol=1e-6)
    assert a.size[0, 0] == pytest.approx(6 / 4)


def test_weights_file_round_trip(tmp_path):
    op = make(keep=7)
    path = tmp_path / "mqt.safetensors"
    op.projector.save(path)
    t = vtc.VisualTokens(x=torch.randn(2, 36, DIM), layout=vtc.Layout.grid(6))
    for w in (str(path), str(tmp_path) + "/"):
        loaded = vtc.build(f"mqt:keep=7,weights={w}")
        assert torch.equal(loaded(t).x, op(t).x)
    spec = op.spec()
    assert spec["op"] == "mqt" and spec["keep"] == 7 and vtc.build([spec])[0].config == op.config


def test_registration_and_errors(tmp_path, monkeypatch):
    assert vtc.create("mqt", keep=4, weights=None, dim=8, out_dim=8, heads=2, queries=4).replaces_projector
    assert MQT.default_stage == "vision"
    with pytest.raises(BudgetError):
        make(keep=Q + 1)
    with pytest.raises(VtcError, match="positive"):
        vtc.create("mqt", keep=0)
    with pytest.raises(ConfigError, match="dim, out_dim, heads and queries"):
        vtc.create("mqt", weights=None)
    with pytest.raises(ConfigError, match="no weights file"):
        vtc.create("mqt", weights=str(tmp_path / "missing.safetensors"))
    monkeypatch.setenv("VTC_ASSETS", str(tmp_path))
    op = vtc.create("mqt", keep=4)  # embedded weights load lazily: the error comes on use
    with pytest.raises(ConfigError, match="not found"):
        op(vtc.VisualTokens(x=torch.randn(1, 36, DIM)))
    anyres = vtc.VisualTokens(x=torch.randn(1, 72, DIM), group=torch.tensor([[0] * 36 + [1] * 36]),
                              layout=vtc.Layout.for_anyres(6, (1, 1)))
    with pytest.raises(LayoutError, match="one partition"):
        make(keep=4)(anyres)


def test_nested_sampling_is_even_and_in_range():
    g = torch.Generator().manual_seed(0)
    ms = [sample_nested_m(g, 256) for _ in range(2000)]
    assert all(m % 2 == 0 and 2 <= m <= 256 for m in ms)
    assert min(ms) == 2 and max(ms) == 256
