"""vtc.integrations.generic.VisualCompressor: a timm ViT or HF tower + an MLP projector + a pipeline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vtc
from vtc.integrations import VisualCompressor
from vtc.integrations.towers import feature_tokens


@pytest.fixture(scope="module")
def vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=0).eval()


@pytest.fixture(scope="module")
def projector():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 48)).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def _reference_features(vit, pixels, block):
    """timm's own intermediate output of ``block`` (patch tokens), independent of vtc's hooks."""
    return vit.forward_intermediates(pixels, indices=[block], norm=False, output_fmt="NLC", intermediates_only=True)[0]


@torch.no_grad()
def test_timm_features_are_the_penultimate_block_patch_tokens(vit, pixels):
    assert torch.equal(feature_tokens(vit, pixels, -2, 1), _reference_features(vit, pixels, 2))
    assert torch.equal(feature_tokens(vit, pixels, 1, 1), _reference_features(vit, pixels, 0))
    two = feature_tokens(vit, pixels, [1, -1], 1)
    assert torch.equal(two, torch.cat([_reference_features(vit, pixels, 0), _reference_features(vit, pixels, 3)], -1))
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in vit.blocks)


@torch.no_grad()
def test_keep_everything_is_the_projected_features(vit, projector, pixels):
    out = VisualCompressor(vit, projector, "identity")(pixels)
    want = projector(_reference_features(vit, pixels, 2))
    assert torch.equal(out.x, want)
    assert out.mask is None and out.counts.tolist() == [64, 64, 64]
    assert torch.equal(out.index, torch.arange(64).expand(3, 64))


@pytest.mark.parametrize("spec", ["divprune:keep=10", "uniform:keep=10", "random:keep=10 | divprune:keep=5",
                                  "test-threshold"])
@torch.no_grad()
def test_kept_tokens_are_the_projector_outputs_at_the_kept_indices(vit, projector, pixels, spec, threshold):
    pipe = vtc.build(threshold()) if spec == "test-threshold" else spec
    out = VisualCompressor(vit, projector, pipe)(pixels)
    proj = projector(_reference_features(vit, pixels, 2))
    for b, (x, idx) in enumerate(zip(out.unbind(), out.tokens.unbind_index())):
        torch.testing.assert_close(x, proj[b, idx], rtol=1e-6, atol=1e-6)
    if spec != "test-threshold":
        assert out.counts.tolist() == [int(spec.split("=")[-1])] * 3
    else:
        assert len(set(out.counts.tolist())) > 1  # different kept counts per image, padded with a mask
        assert (out.x[~out.mask] == 0).all()


@torch.no_grad()
def test_compress_precomputed_features(projector):
    feats = torch.randn(2, 36, 32, generator=torch.Generator().manual_seed(3))
    out = VisualCompressor(nn.Identity(), projector, "pool:keep=9").compress(feats)  # pool runs after the projector
    grid = projector(feats).view(2, 6, 6, 48).permute(0, 3, 1, 2)
    want = torch.nn.functional.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(2, 9, 48)
    torch.testing.assert_close(out.x, want)
    assert out.index[0].tolist() == [0, 2, 4, 12, 14, 16, 24, 26, 28]  # each window's first patch
    with pytest.raises(vtc.VtcError, match="signals"):
        VisualCompressor(nn.Identity(), projector, "vtc-cls:keep=4,layers=[1]", prefix=1).compress(feats)


@torch.no_grad()
def test_hf_tower_with_a_projector(llava, photos):
    model, proc = llava
    pix = proc(images=photos[:2], text=["<image>", "<image>"], return_tensors="pt", padding=True)["pixel_values"]
    comp = VisualCompressor(model.model.vision_tower, model.model.multi_modal_projector, "divprune:keep=32")
    out = comp(pix)
    hs = model.model.vision_tower(pix, output_hidden_states=True).hidden_states[-2][:, 1:]
    proj = model.model.multi_modal_projector(hs)
    assert out.x.shape == (2, 32, proj.shape[-1])
    for b in range(2):
        torch.testing.assert_close(out.x[b], proj[b, out.index[b]])


def _cls_attention_reference(vit, pixels, layer):
    """Head-mean post-softmax CLS->patch attention of ``blocks[layer]``, from its qkv projection."""
    got = {}
    h = vit.blocks[layer].attn.qkv.register_forward_hook(lambda _m, _a, out: got.__setitem__("qkv", out))
    try:
        vit.forward_features(pixels)
    finally:
        h.remove()
    B, N, _ = got["qkv"].shape
    heads = vit.blocks[layer].attn.num_heads
    q, k, _ = got["qkv"].view(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = vit.blocks[layer].attn.q_norm(q), vit.blocks[layer].attn.k_norm(k)
    att = (q[:, :, :1] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)  # [B, H, 1, N]
    return att[:, :, 0, 1:].mean(1)


@torch.no_grad()
def test_vision_stage_signals_from_a_timm_tower(vit, projector, pixels):
    comp = VisualCompressor(vit, projector, "vtc-cls:keep=8,layers=[2]")
    out = comp(pixels)
    want = torch.topk(_cls_attention_reference(vit, pixels, 2), 8).indices.sort(1).values
    assert torch.equal(out.index, want)
    comp.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in vit.modules())
