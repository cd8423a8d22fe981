"""vtc.apply on stock LLaVA-OneVision (tiny random model: SigLIP without CLS, AnyRes, packed crop grid).

The tiny model uses ``vision_aspect_ratio="anyres_max_2"``, so the photos' 3x3 and 1x3 crop grids
are bilinearly downsampled after unpadding (as large images are on the real ``anyres_max_9``), and a
prompt with two images takes each one's base view only.
"""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.errors import ConfigError, SignalError
from vtc.integrations.adapters import adapter_for

GEN = dict(max_new_tokens=4, do_sample=False)
PROMPTS = ["user : <image> what is this ?", "<image> describe", "user : what color is the <image> ?"]


@pytest.fixture(scope="module")
def onevision():
    from vtc.models.random import random_llava_onevision

    return random_llava_onevision(patch_size=8)


@pytest.fixture(scope="module")
def inputs(onevision, photos):
    model, proc = onevision
    batch = proc(images=photos, text=PROMPTS, return_tensors="pt", padding=True)
    alone = [proc(images=[im], text=[t], return_tensors="pt") for im, t in zip(photos, PROMPTS)]
    multi = proc(images=[photos[:2]], text=["<image> and <image> ?"], return_tensors="pt")
    return batch, alone, multi


@torch.no_grad()
def test_keep_everything_is_the_stock_model(onevision, inputs):
    model, _ = onevision
    batch, _, multi = inputs
    assert adapter_for(model).family == "llava_onevision"
    for call in (batch, multi):
        ref, ref_gen = model(**call).logits, model.generate(**call, **GEN)
        for spec in ("identity", "random:keep=100000,stage=llm | divprune:keep=100000"):
            with vtc.apply(model, spec) as h:
                assert torch.equal(model(**call).logits, ref), spec
                assert torch.equal(model.generate(**call, **GEN), ref_gen), spec
            assert h.last.counts == h.last.stock_counts
    assert h.last.stock_counts == [144 + 1, 144 + 1]  # several images: base views, one newline each


@torch.no_grad()
def test_packed_grid_is_the_models_own(onevision, inputs):
    """Each image is the base view and the packed (unpadded, downsampled) crop grid, whose size and
    newline count give stock's placeholder count."""
    model, _ = onevision
    batch, _, _ = inputs
    with vtc.apply(model, "hiprune:keep=40") as h:  # a vision-stage operator reading packed signals
        model(**batch)
    placeholders = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    layouts = h.last.tokens.layouts()
    for lay, stock in zip(layouts, placeholders):
        (bh, bw), (gh, gw) = lay.grids
        assert (bh, bw) == (12, 12) and stock == 144 + gh * (gw + 1)
    # 3x3 crops unpadded to 24x36 and 3x2 to 36x16: both downsampled (ratio > 1.1); 1x3 unpadded to 8x36 only
    assert [lay.grids[1] for lay in layouts] == [(13, 20), (25, 11), (8, 36)]
    assert h.last.counts == [40, 40, 40]  # HiPrune official: 20 per partition, no newline tokens
    assert all(0 <= i < lay.num_tokens for idx, lay in zip(h.last.index, layouts) for i in idx.tolist())


@pytest.mark.parametrize("spec, counts", [("divprune:keep=50", [50, 50, 50]), ("tome:keep=30", None)])
@torch.no_grad()
def test_language_model_gets_the_kept_tokens(onevision, inputs, lm_inputs, spec, counts):
    model, _ = onevision
    batch, _, _ = inputs
    with vtc.apply(model, spec) as h, lm_inputs(model) as rec:
        model(**batch)
    embeds = rec.calls[0]["inputs_embeds"]
    pos = h.last.positions
    was_image = (batch["input_ids"].gather(1, pos.clamp_min(0)) == model.config.image_token_id) & (pos >= 0)
    assert was_image.sum(1).tolist() == h.last.counts
    if counts is not None:
        assert h.last.counts == counts
    torch.testing.assert_close(embeds[was_image], h.last.tokens.x[h.last.tokens.valid])


@torch.no_grad()
def test_cached_generate_equals_uncached_and_batch_equals_each_alone(onevision, inputs, threshold):
    model, _ = onevision
    batch, alone, _ = inputs
    with vtc.apply(model, vtc.build(threshold(stage="vision"))) as h:
        out = model(**batch)
        counts = h.last.counts
        cached = model.generate(**batch, **GEN)
        assert torch.equal(cached, model.generate(**batch, **GEN, use_cache=False))
        singles = [(model(**one).logits[0, -1], h.last.counts[0], h.last.tokens.x[0, :h.last.counts[0]])
                   for one in alone]
    assert len(set(counts)) == 3, counts
    with vtc.apply(model, vtc.build(threshold(stage="vision"))) as h:
        model(**batch)
        for b, (logit, count, x) in enumerate(singles):
            assert counts[b] == count
            assert torch.equal(h.last.tokens.x[b, :count], x)  # the same tokens, batched or alone
            torch.testing.assert_close(out.logits[b, -1], logit, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_remove_restores_the_model(onevision, inputs):
    model, _ = onevision
    batch, _, _ = inputs
    ref = model(**batch).logits
    h = vtc.apply(model, "tome:keep=30")
    assert model(**batch).logits.shape[1] < ref.shape[1]
    h.remove()
    assert "forward" not in model.__dict__
    assert torch.equal(model(**batch).logits, ref)


@torch.no_grad()
def test_vision_stage_keep_all_is_stock_where_the_grid_is_not_downsampled(photos):
    """Unpadding is a reordering, which commutes with the per-token projector; the downsample does not
    (the module docstring), so this model's aspect ratio never downsamples."""
    from vtc.models.random import random_llava_onevision

    model, proc = random_llava_onevision(patch_size=8, max_crops=9)
    batch = proc(images=photos[:2], text=PROMPTS[:2], return_tensors="pt", padding=True)
    ref = model(**batch).logits
    with vtc.apply(model, "random:keep=100000,stage=vision") as h:
        assert torch.equal(model(**batch).logits, ref)
    assert all(lay.grids[1][0] * lay.grids[1][1] > 144 for lay in h.last.tokens.layouts())


def test_what_the_family_refuses(onevision):
    model, _ = onevision
    with pytest.raises(ConfigError, match="unpad=False"):
        vtc.apply(model, "pool:keep=4", unpad=False)
    with pytest.raises(SignalError, match="no CLS token.*divprune.*hiprune, visionzip:signal=attn_received"):  # SigLIP
        vtc.apply(model, "vtc-cls:keep=10")
    assert "forward" not in model.__dict__


def test_flops_shapes_and_tower_passes(onevision, inputs):
    from vtc.bench.flops import ModelShape

    model, _ = onevision
    batch, _, multi = inputs
    shape = ModelShape.from_model(model)
    assert shape == ModelShape.from_config(model.config)
    assert (shape.vision.cls_token, shape.vision.feature_layer, shape.vision.heads) == (False, 3, 4)
    ad = adapter_for(model)
    assert [len(g) for g in ad.tower_grids(batch)] == [10, 7, 4]  # base + 3x3, 3x2, 1x3 crops
    assert ad.tower_grids(multi) == [[(12, 12), (12, 12)]]  # two images, base views only
