"""CLS-free tap signals on batched towers: attn_received and key_norms equal a brute-force eager computation.

Each tiny random tower (HF CLIP, HF SigLIP, timm CLIP-style ViT, timm ViT with 2 registers and
qk-norm, open_clip) runs once with its fused attention and a tap, and once on an eager path whose
full ``[B, H, N, N]`` softmax map the test materialises. ``attn_received`` must equal the column
mean of that map over ALL query rows (prefix rows included) and heads, prefix columns dropped
(HiPrune's score); ``key_norms`` the mean over heads of each head's key L2 norm. Chunking over query
rows must not change the result, and the tap path must never hold an ``N x N`` score block.
"""

import copy

import pytest
import torch

pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
pytest.importorskip("open_clip")
from open_clip.transformer import VisionTransformer  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel  # noqa: E402

from vtc.errors import TapError  # noqa: E402
from vtc.taps import attach  # noqa: E402
from vtc.taps.received import chunk_rows, key_norms, received_attention  # noqa: E402

L, H, D, d = 3, 4, 32, 8
LAYERS = [0, 2]
CLS_FREE = {"attn_received": LAYERS, "key_norms": LAYERS}


# ---------------------------------------------------------------------- towers and eager references
def _hf(cls, cfg_cls, seed):
    torch.manual_seed(seed)
    cfg = cfg_cls(hidden_size=D, intermediate_size=64, num_hidden_layers=L, num_attention_heads=H, image_size=32,
                  patch_size=8, attn_implementation="sdpa")
    return cls(cfg).eval()


def _hf_reference(model, x):
    """Eager attention maps (output_attentions) and per-head keys from the eager run's k_proj."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    ks = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, i, o, l=l: ks.__setitem__(l, o))
             for l, layer in enumerate(ref.encoder.layers)]
    with torch.no_grad():
        out = ref(x, output_attentions=True)
    for h in hooks:
        h.remove()
    B, N = ks[0].shape[:2]
    return list(out.attentions), [ks[l].view(B, N, H, d).transpose(1, 2) for l in range(L)]


def _timm(reg, seed):
    torch.manual_seed(seed)
    kw = dict(pretrained=False, patch_size=8, embed_dim=D, depth=L, num_heads=H, mlp_ratio=2.0, num_classes=0)
    if reg:
        return timm.create_model("vit_small_patch16_224", img_size=32, reg_tokens=2, qk_norm=True, **kw).eval()
    return timm.create_model("vit_base_patch16_clip_224", img_size=32, **kw).eval()


def _timm_reference(model, x):
    """Softmax maps from timm's non-fused path (input of attn_drop) and keys from its own qkv + k_norm."""
    ref = copy.deepcopy(model)
    probs, qkv = {}, {}
    hooks = []
    for l, blk in enumerate(ref.blocks):
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, i, o, l=l: probs.__setitem__(l, i[0])))
        hooks.append(blk.attn.qkv.register_forward_hook(lambda m, i, o, l=l: qkv.__setitem__(l, o)))
    with torch.no_grad():
        ref(x)
        B, N = qkv[0].shape[:2]
        keys = [ref.blocks[l].attn.k_norm(qkv[l].view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)[1]) for l in range(L)]
    for h in hooks:
        h.remove()
    return [probs[l] for l in range(L)], keys


def _open_clip(seed):
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=32, patch_size=8, width=D, layers=L, heads=H, mlp_ratio=2.0,
                              output_dim=16).eval()
    with torch.no_grad():
        for blk in model.transformer.resblocks:
            blk.attn.in_proj_bias.normal_(0, 0.5)
    return model


def _open_clip_reference(model, x):
    """Per-head maps from nn.MultiheadAttention(need_weights=True) and keys by explicit projection."""
    ref = copy.deepcopy(model)
    inputs = {}
    hooks = [blk.attn.register_forward_pre_hook(lambda m, a, kw, l=l: inputs.__setitem__(l, a[0]), with_kwargs=True)
             for l, blk in enumerate(ref.transformer.resblocks)]
    with torch.no_grad():
        ref(x)
        probs, keys = [], []
        for l, blk in enumerate(ref.transformer.resblocks):
            a, xin = blk.attn, inputs[l]
            B, N = xin.shape[:2]
            probs.append(a(xin, xin, xin, need_weights=True, average_attn_weights=False)[1])
            k = torch.nn.functional.linear(xin, a.in_proj_weight[D:2 * D], a.in_proj_bias[D:2 * D])
            keys.append(k.view(B, N, H, d).transpose(1, 2))
    for h in hooks:
        h.remove()
    return probs, keys


CASES = {  # name: (build, reference, prefix tokens)
    "hf_clip": (lambda: _hf(CLIPVisionModel, CLIPVisionConfig, 0), _hf_reference, 1),
    "hf_siglip": (lambda: _hf(SiglipVisionModel, SiglipVisionConfig, 1), _hf_reference, 0),
    "timm_clip": (lambda: _timm(False, 2), _timm_reference, 1),
    "timm_registers": (lambda: _timm(True, 3), _timm_reference, 3),
    "open_clip": (lambda: _open_clip(4), _open_clip_reference, 1),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    build, reference, prefix = CASES[request.param]
    model = build()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    probs, keys = reference(model, x)
    return model, x, prefix, probs, keys


# ---------------------------------------------------------------------- the signals
def test_signals_equal_the_eager_attention_map(case):
    model, x, p, probs, keys = case
    with attach(model, CLS_FREE) as tap, torch.no_grad():
        model(x)
    for l in LAYERS:
        A = probs[l]  # [B, H, N, N], the full map: reference only
        N = A.shape[-1]
        want = A.mean(dim=(1, 2))[:, p:]  # all N query rows (prefix rows included), all heads; prefix columns dropped
        got = tap.signals["attn_received"][l]
        assert got.shape == (2, N - p) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tap.signals["key_norms"][l], keys[l].norm(dim=-1).mean(1)[:, p:], atol=1e-5, rtol=1e-5)
    if p == 0:  # no column dropped: every query row's softmax sums to 1, so the column means sum to 1
        torch.testing.assert_close(tap.signals["attn_received"][0].sum(1), torch.ones(2))


def test_key_norms_are_not_the_norm_of_the_head_mean_key(case):
    model, x, p, _, keys = case
    with attach(model, {"key_norms": [1], "keys": [1]}) as tap, torch.no_grad():
        model(x)
    head_mean_norm = tap.signals["keys"][1].float().norm(dim=-1)
    assert (tap.signals["key_norms"][1] > head_mean_norm).all()  # triangle inequality, strict for random heads


def test_chunked_rows_equal_one_chunk_and_outputs_are_unchanged(case):
    model, x, *_ = case
    with torch.no_grad():
        want_out = model(x)
        with attach(model, CLS_FREE) as one:
            got_out = model(x)
        with attach(model, CLS_FREE, max_chunk_elements=1) as chunked:  # one query row per chunk
            model(x)
    for l in LAYERS:
        torch.testing.assert_close(chunked.signals["attn_received"][l], one.signals["attn_received"][l],
                                   atol=1e-7, rtol=1e-6)
    a, b = (o if isinstance(o, torch.Tensor) else o.last_hidden_state for o in (want_out, got_out))
    assert torch.equal(a, b)


def _square_blocks(model, x, recorder, **kw):
    """Shapes ``[..., N, N]`` produced anywhere in a tapped forward (tower and tap alike)."""
    with attach(model, {"attn_received": [0, 1, 2]}, **kw) as tap, torch.no_grad(), recorder() as rec:
        model(x)
    N = tap.num_tokens
    return [s for s in rec.shapes if len(s) >= 2 and s[-2:] == (N, N)], rec.shapes, N


def test_no_n_by_n_scores_on_the_tap_path(case, shapes):
    model, x, p, *_ = case
    B, N = x.shape[0], 16 + p
    square, seen, n = _square_blocks(model, x, shapes, max_chunk_elements=B * H * 5 * N)
    assert n == N and square == []  # neither the fused tower nor the chunked tap made an N x N block
    rows = {s[-2] for s in seen if len(s) == 4 and s[-1] == N and s[:2] == (B, H)} - {d}  # d: the keys, transposed
    assert rows == {5, N % 5}  # score chunks of 5 query rows, and the remainder
    # the check can fail: one chunk of every row is an N x N block
    square, _, _ = _square_blocks(model, x, shapes, max_chunk_elements=10**9)
    assert (B, H, N, N) in square


# ---------------------------------------------------------------------- the helpers
def test_received_attention_is_the_column_sum_of_the_softmax_in_any_chunking():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 5, generator=g), torch.randn(2, 3, 11, 5, generator=g)
    full = (q @ k.transpose(-1, -2) * 0.4).softmax(-1)  # [2, 3, 7, 11]
    for budget in (1, 2 * 3 * 11 * 3, None):
        torch.testing.assert_close(received_attention(q, k, 0.4, budget), full.sum(2).mean(1), atol=1e-6, rtol=1e-6)
    assert chunk_rows(6, 7, 11, 1) == 1 and chunk_rows(6, 7, 11, 6 * 11 * 3) == 3 and chunk_rows(6, 7, 11) == 7
    torch.testing.assert_close(key_norms(k), k.norm(dim=-1).mean(1))


def test_cls_signals_on_siglip_name_the_cls_free_ones():
    siglip = _hf(SiglipVisionModel, SiglipVisionConfig, 1)
    with pytest.raises(TapError, match="no CLS token.*'attn_received'.*'key_norms'"):
        attach(siglip, {"cls_attn": [0]})


@pytest.mark.parametrize("bad", [0, -3, True])
def test_max_chunk_elements_must_be_positive(bad):
    with pytest.raises(TapError, match="max_chunk_elements"):
        attach(_open_clip(0), {"attn_received": [0]}, max_chunk_elements=bad)
