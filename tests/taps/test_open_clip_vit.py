"""vtc.taps.open_clip_vit: taps on a tiny random open_clip VisionTransformer match need_weights=True attention."""

import copy

import pytest
import torch

pytest.importorskip("open_clip")
from open_clip.transformer import VisionTransformer  # noqa: E402

from vtc.errors import TapError, UnsupportedModelError  # noqa: E402
from vtc.taps import attach  # noqa: E402

L, H, D, d = 4, 4, 32, 8
LAYERS = [0, 2, 3]
ALL = {"cls_attn": LAYERS, "cls_logits": LAYERS, "keys": LAYERS, "hidden": LAYERS}


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, width=D, layers=L, heads=H, mlp_ratio=2.0,
                              output_dim=16).eval()
    with torch.no_grad():  # a fresh tower's in-proj bias is zero: make it count
        for blk in model.transformer.resblocks:
            blk.attn.in_proj_bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def eager_reference(model, x):
    """Per-head maps from nn.MultiheadAttention(need_weights=True), full logits and keys by explicit projection."""
    ref = copy.deepcopy(model)
    inputs = {}
    hooks = [blk.attn.register_forward_pre_hook(lambda m, a, kw, l=l: inputs.__setitem__(l, a[0]), with_kwargs=True)
             for l, blk in enumerate(ref.transformer.resblocks)]
    with torch.no_grad():
        ref(x)
        hidden = ref.forward_intermediates(x, indices=list(range(L)), output_fmt="NLC",
                                           intermediates_only=True)["image_intermediates"]
    for h in hooks:
        h.remove()
    probs, logits, keys = {}, {}, {}
    with torch.no_grad():
        for l, blk in enumerate(ref.transformer.resblocks):
            a, xin = blk.attn, inputs[l]
            B, N = xin.shape[:2]
            _, probs[l] = a(xin, xin, xin, need_weights=True, average_attn_weights=False)
            q = torch.nn.functional.linear(xin, a.in_proj_weight[:D], a.in_proj_bias[:D]).view(B, N, H, d).transpose(1, 2)
            k = torch.nn.functional.linear(xin, a.in_proj_weight[D:2 * D], a.in_proj_bias[D:2 * D])
            k = k.view(B, N, H, d).transpose(1, 2)
            logits[l] = q @ k.transpose(-1, -2) * d**-0.5
            keys[l] = k.mean(1)
            torch.testing.assert_close(logits[l].softmax(-1), probs[l], atol=1e-6, rtol=0)
    return probs, logits, keys, hidden


def test_signals_equal_eager_attention(tower, pixels):
    attn, logits, keys, hidden = eager_reference(tower, pixels)
    with attach(tower, ALL) as tap, torch.no_grad():
        tower(pixels)
    for l in LAYERS:
        torch.testing.assert_close(tap.signals["cls_attn"][l], attn[l][:, :, 0, 1:].mean(1), atol=1e-5, rtol=0)
        torch.testing.assert_close(tap.signals["cls_logits"][l], logits[l][:, :, 0, 1:].mean(1), atol=1e-5, rtol=0)
        torch.testing.assert_close(tap.signals["keys"][l], keys[l][:, 1:], atol=1e-5, rtol=0)
        torch.testing.assert_close(tap.signals["hidden"][l], hidden[l], atol=1e-5, rtol=0)
    assert tap.signals["keys"][0].shape == (2, 16, d)


def test_outputs_bit_identical_with_tap(tower, pixels):
    with torch.no_grad():
        want = tower(pixels)
        with attach(tower, ALL):
            got = tower(pixels)
    assert torch.equal(got, want)


def test_remove_leaves_no_hook_or_attribute(tower, pixels, snapshot):
    before = snapshot(tower)
    with attach(tower, ALL):
        assert snapshot(tower) != before
        with torch.no_grad():
            tower(pixels)
    assert snapshot(tower) == before


def test_nonexistent_layer_raises(tower):
    with pytest.raises(TapError, match=r"0\.\.3"):
        attach(tower, {"cls_logits": [-5]})


def test_custom_attention_blocks_are_unsupported():
    model = VisionTransformer(image_size=32, patch_size=8, width=D, layers=1, heads=H, mlp_ratio=2.0, output_dim=16,
                              qk_norm=True)
    with pytest.raises(UnsupportedModelError, match="MultiheadAttention"):
        attach(model, {"keys": [0]})


def test_whole_clip_model_and_timm_trunk_resolve_to_their_image_tower():
    from open_clip.model import CLIP
    from open_clip.timm_model import TimmModel

    torch.manual_seed(0)
    clip = CLIP(embed_dim=16, vision_cfg=dict(width=D, layers=2, head_width=d, image_size=32, patch_size=8),
                text_cfg=dict(context_length=8, vocab_size=64, width=D, heads=H, layers=1))
    with attach(clip, {"keys": [-1]}) as tap, torch.no_grad():
        clip.encode_image(torch.randn(1, 3, 32, 32))
    assert tap.family == "open_clip VisionTransformer" and tap.signals["keys"][1].shape == (1, 16, d)
    trunk = TimmModel("vit_tiny_patch16_224", embed_dim=16)
    with attach(trunk, {"cls_attn": [-1]}) as tap:
        assert tap.family == "timm VisionTransformer" and tap.requires == {"cls_attn": [11]}
        assert trunk.trunk.blocks[11].attn.q_norm._forward_hooks  # hooked inside the trunk
