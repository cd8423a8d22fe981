"""vtc.taps.timm_vit: taps on tiny random timm VisionTransformers (fused attention) match eager attention."""

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

from vtc.errors import TapError, UnsupportedModelError  # noqa: E402
from vtc.taps import attach  # noqa: E402

L, H, D, d = 4, 4, 32, 8
LAYERS = [0, 2, 3]
ALL = {"cls_attn": LAYERS, "cls_logits": LAYERS, "keys": LAYERS, "hidden": LAYERS}
TINY = dict(pretrained=False, patch_size=8, embed_dim=D, depth=L, num_heads=H, mlp_ratio=2.0, num_classes=0)


def _clip_vit():
    """A vit_*_clip_* model (pre-norm, CLS token, QuickGELU-free), 32x32 pixels, 4x4 patches."""
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_clip_224", img_size=32, **TINY).eval()


def _reg_qknorm_vit():
    """CLS + 2 register tokens, qk-norm, a non-square 4x6 grid."""
    torch.manual_seed(1)
    return timm.create_model("vit_small_patch16_224", img_size=(32, 48), reg_tokens=2, qk_norm=True, **TINY).eval()


MODELS = {"clip": (_clip_vit, (32, 32)), "reg_qknorm": (_reg_qknorm_vit, (32, 48))}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    make, (h, w) = MODELS[request.param]
    model = make()
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(2))
    return model, x


def eager_reference(model, x):
    """Post-softmax maps from timm's non-fused path, full logits and keys from its own qkv projection."""
    ref = copy.deepcopy(model)
    probs, qkv = {}, {}
    hooks = []
    for l, blk in enumerate(ref.blocks):
        blk.attn.fused_attn = False
        # with fused_attn off, attn_drop receives softmax(q kᵀ · scale)
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, i, o, l=l: probs.__setitem__(l, i[0])))
        hooks.append(blk.attn.qkv.register_forward_hook(lambda m, i, o, l=l: qkv.__setitem__(l, o)))
    with torch.no_grad():
        ref(x)
        hidden = ref.forward_intermediates(x, indices=list(range(L)), output_fmt="NLC", intermediates_only=True)
    for h in hooks:
        h.remove()
    B, N = x.shape[0], qkv[0].shape[1]
    logits, keys = {}, {}
    with torch.no_grad():
        for l, blk in enumerate(ref.blocks):
            q, k, _ = qkv[l].view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
            q, k = blk.attn.q_norm(q), blk.attn.k_norm(k)
            logits[l] = q @ k.transpose(-1, -2) * d**-0.5
            keys[l] = k.mean(1)
            torch.testing.assert_close(logits[l].softmax(-1), probs[l], atol=1e-6, rtol=0)
    return probs, logits, keys, hidden


def test_signals_equal_eager_attention(case):
    model, x = case
    p = model.num_prefix_tokens
    attn, logits, keys, hidden = eager_reference(model, x)
    with attach(model, ALL) as tap, torch.no_grad():
        model(x)
    assert all(blk.attn.fused_attn for blk in model.blocks)
    n = x.shape[2] // 8 * x.shape[3] // 8
    for l in LAYERS:
        torch.testing.assert_close(tap.signals["cls_attn"][l], attn[l][:, :, 0, p:].mean(1), atol=1e-5, rtol=0)
        torch.testing.assert_close(tap.signals["cls_logits"][l], logits[l][:, :, 0, p:].mean(1), atol=1e-5, rtol=0)
        torch.testing.assert_close(tap.signals["keys"][l], keys[l][:, p:], atol=1e-5, rtol=0)
        torch.testing.assert_close(tap.signals["hidden"][l], hidden[l], atol=1e-5, rtol=0)
        assert tap.signals["cls_attn"][l].shape == (2, n)
    # the CLS row sums to 1 over all keys: the patch columns hold less than 1 when prefix tokens exist
    assert bool((tap.signals["cls_attn"][0].sum(1) < 1).all())


def test_outputs_bit_identical_with_tap(case):
    model, x = case
    with torch.no_grad():
        want = model.forward_features(x)
        with attach(model, ALL):
            got = model.forward_features(x)
    assert torch.equal(got, want)


def test_remove_leaves_no_hook_or_attribute(case, snapshot):
    model, x = case
    before = snapshot(model)
    with attach(model, ALL):
        assert snapshot(model) != before
        with torch.no_grad():
            model(x)
    assert snapshot(model) == before


def test_nonexistent_layer_raises(case):
    model, _ = case
    with pytest.raises(TapError, match=r"4 layers, valid layers are 0\.\.3"):
        attach(model, {"hidden": [4]})


def test_no_class_token_refuses_cls_signals_but_records_keys():
    torch.manual_seed(3)
    model = timm.create_model("vit_small_patch16_224", img_size=32, class_token=False, global_pool="avg", **TINY).eval()
    with pytest.raises(TapError, match="no CLS token"):
        attach(model, {"cls_attn": [1]})
    x = torch.randn(1, 3, 32, 32)
    _, _, keys, _ = eager_reference(model, x)
    with attach(model, {"keys": [1]}) as tap, torch.no_grad():
        model(x)
    torch.testing.assert_close(tap.signals["keys"][1], keys[1], atol=1e-5, rtol=0)


def test_other_timm_architectures_are_unsupported():
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with pytest.raises(UnsupportedModelError):
        attach(model, {"keys": [0]})
