"""vtc.apply on stock Qwen2-VL, Qwen2.5-VL and Qwen3-VL (tiny random models, fp32, CPU).

Operators run after the 2x2 merger on the tokens the language model receives; positions are
M-RoPE. The reference for the rebuilt position ids is written here from the model family's rule
(text ids count up; an image's tokens get ``start + (0, row, col)`` on the merged grid; the text
after an image continues from ``start + max(h, w)``), independently of the implementation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vtc
from vtc.errors import ConfigError, SignalError

GEN = dict(max_new_tokens=6, do_sample=False)
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def qwen_models():
    from vtc.models import random as R

    return {"qwen2_vl": R.random_qwen2_vl(), "qwen2_5_vl": R.random_qwen2_5_vl(), "qwen3_vl": R.random_qwen3_vl()}


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    rng = np.random.default_rng(0)
    # merged grids 6x8, 10x5 and 4x4 (48, 50 and 16 tokens); the 80x40 one spans windows unevenly
    return [Image.fromarray((rng.random(s) * 255).astype("uint8")) for s in ((48, 64, 3), (80, 40, 3), (32, 32, 3))]


def _prompts():
    from vtc.models.random import QWEN_IMAGE as IMG

    # the first prompt holds two images; lengths differ, so the batch is left-padded
    return [f"user : {IMG} and {IMG} what is this ? assistant :", f"{IMG} describe"], [[0, 1], [2]]


@pytest.fixture(scope="module")
def batches(images):
    texts, which = _prompts()
    return texts, [[images[i] for i in w] for w in which]


def _batch(proc, texts, ims):
    return proc(images=[im for per in ims for im in per], text=texts, return_tensors="pt", padding=True)


class _LMCalls:
    """What the language model receives per call (inputs_embeds, position_ids, mask, DeepStack)."""

    def __init__(self, model):
        self.calls = []
        self._h = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _m, _args, kw):
        self.calls.append({k: kw.get(k) for k in ("inputs_embeds", "position_ids", "attention_mask",
                                                  "deepstack_visual_embeds", "visual_pos_masks")})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._h.remove()


def _reference_positions(ids, mask, image_id, grids, kept_index):
    """M-RoPE ids ``[3, B, L]`` of a compacted prompt by the family's rule (see the module docstring).

    ``grids``: merged ``(h, w)`` of each image in prompt order; ``kept_index``: each image's kept
    tokens' raster positions in that grid, in the order they stand in the prompt.
    """
    B, L = ids.shape
    out = torch.zeros(3, B, L, dtype=torch.long)
    img = 0
    for b in range(B):
        cur, t = 0, 0
        while t < L:
            if not mask[b, t]:
                t += 1
                continue
            if ids[b, t] != image_id:
                out[:, b, t] = cur
                cur += 1
                t += 1
                continue
            h, w = grids[img]
            for j in kept_index[img].tolist():
                assert ids[b, t] == image_id
                out[:, b, t] = torch.tensor([cur, cur + j // w, cur + j % w])
                t += 1
            cur += max(h, w)
            img += 1
    return out


def _grids(batch):
    return [(int(h) // 2, int(w) // 2) for _, h, w in batch["image_grid_thw"].tolist()]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_keep_everything_is_the_stock_model(qwen_models, batches, family):
    model, proc = qwen_models[family]
    batch = _batch(proc, *batches)
    ref, ref_gen = model(**batch).logits, model.generate(**batch, **GEN)
    for spec in ("identity", "random:keep=1000 | divprune:keep=1000"):
        with vtc.apply(model, spec) as h:
            out = model(**batch)
            gen = model.generate(**batch, **GEN)
        assert torch.equal(out.logits, ref), spec
        assert torch.equal(gen, ref_gen), spec
        assert h.last.counts == h.last.stock_counts == [48, 50, 16]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_keep_k_feeds_the_kept_merged_tokens_at_their_grid_positions(qwen_models, batches, family):
    model, proc = qwen_models[family]
    batch = _batch(proc, *batches)
    stock = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    with vtc.apply(model, "uniform:keep=12") as h, _LMCalls(model) as rec:
        model(**batch)
    call = rec.calls[0]
    assert h.last.counts == [12, 12, 12]
    ids = batch["input_ids"].gather(1, h.last.positions.clamp_min(0))  # the compacted prompt's ids
    image_id = model.config.image_token_id
    visual = (ids == image_id) & (h.last.positions >= 0)
    want = torch.cat([f[i] for f, i in zip(stock.pooler_output, h.last.index)])
    assert torch.equal(call["inputs_embeds"][visual], want)
    for idx, (gh, gw) in zip(h.last.index, _grids(batch)):  # uniform's pick on each merged grid
        assert torch.equal(idx, vtc.create("uniform", keep=12)(
            vtc.VisualTokens(x=torch.zeros(1, gh * gw, 1), layout=vtc.Layout.grid(gh, gw))).index[0])
    if family == "qwen3_vl":  # DeepStack features follow the kept tokens into the decoder
        deep = [torch.cat([f[i] for f, i in zip(layer, h.last.index)]) for layer in stock.deepstack_features]
        assert all(torch.equal(a, b) for a, b in zip(call["deepstack_visual_embeds"], deep))
        assert torch.equal(call["visual_pos_masks"], visual)
    mask = batch["attention_mask"].gather(1, h.last.positions.clamp_min(0)) * (h.last.positions >= 0)
    ref = _reference_positions(ids, mask.bool(), image_id, _grids(batch), h.last.index)
    got = call["position_ids"]
    real = mask.bool()
    assert torch.equal(got[-3:][:, real], ref[:, real])


# threshold: a content-dependent count per image; divprune:keep=16 keeps all of the 16-token image, so
# the second prompt drops nothing and the compacted batch keeps its length while the first gains padding
@pytest.mark.parametrize("family,spec", [("qwen2_5_vl", "threshold"), ("qwen3_vl", "divprune:keep=16")])
@torch.no_grad()
def test_batch_equals_each_alone_and_cached_generate_equals_uncached(qwen_models, batches, threshold, family, spec):
    model, proc = qwen_models[family]
    texts, ims = batches
    batch = _batch(proc, texts, ims)
    pipe = vtc.build(threshold() if spec == "threshold" else spec)
    L = batch["input_ids"].shape[1]
    with vtc.apply(model, pipe) as h, _LMCalls(model) as rec:
        out = model(**batch)
        counts = h.last.counts
        gen = model.generate(**batch, **GEN)
        uncached = model.generate(**batch, **GEN, use_cache=False)
        first = len(rec.calls)
        singles = []
        for t, im in zip(texts, ims):
            one = _batch(proc, [t], [im])
            singles.append((model(**one).logits[0, -1], model.generate(**one, **GEN)[0, one["input_ids"].shape[1]:],
                            h.last.counts))
    if spec == "threshold":
        assert len(set(counts)) == 3 and sum(counts) < 48 + 50 + 16, counts
    else:
        assert counts == [16, 16, 16]
    assert torch.equal(gen, uncached)
    # decoding continues M-RoPE from the prompt's largest id + 1 (generate passes [4, B, 1] ids)
    prefill, step = rec.calls[1], rec.calls[2]
    real = prefill["attention_mask"].bool()
    top = prefill["position_ids"][-3:].masked_fill(~real, -1).amax(dim=(0, 2))
    assert torch.equal(step["position_ids"][-3:, :, 0], (top + 1).expand(3, -1))
    assert first > 3
    n_img = [len(per) for per in ims]
    for b, (logit, new, count) in enumerate(singles):
        mine = counts[sum(n_img[:b]):sum(n_img[:b + 1])]
        assert mine == count
        torch.testing.assert_close(out.logits[b, -1], logit, rtol=1e-5, atol=1e-5)
        assert torch.equal(gen[b, L:L + len(new)], new)
        assert torch.equal(gen[b, :L], batch["input_ids"][b])


@torch.no_grad()
def test_decoding_without_position_ids_continues_from_the_prompt(qwen_models, batches):
    """A user's loop that passes no position ids gets what stock gives: the prompt's largest id + 1 on."""
    model, proc = qwen_models["qwen2_vl"]
    batch = _batch(proc, *batches)
    with vtc.apply(model, "pool:keep=8") as h, _LMCalls(model) as rec:
        out = model(**batch, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], 1)
        model(input_ids=nxt, attention_mask=mask, cache=out.cache)
    real = rec.calls[0]["attention_mask"].bool()
    top = rec.calls[0]["position_ids"].masked_fill(~real, -1).amax(dim=(0, 2))
    assert torch.equal(rec.calls[1]["position_ids"], (top + 1).view(1, -1, 1).expand(3, -1, 1))
    assert h.last.counts == [8, 8, 8] and [lay.pooled for lay in h.last.tokens.layouts()][0] is not None


@torch.no_grad()
def test_remove_restores_the_model(qwen_models, batches):
    model, proc = qwen_models["qwen2_5_vl"]
    batch = _batch(proc, *batches)
    ref = model(**batch).logits
    before = dict(model.__dict__)
    with vtc.apply(model, "tome:keep=10"):
        assert model(**batch).logits.shape[1] < ref.shape[1]
    assert model.__dict__.keys() == before.keys()
    assert torch.equal(model(**batch).logits, ref)


def test_what_qwen_cannot_run_is_a_clear_error(qwen_models):
    model, _ = qwen_models["qwen2_vl"]
    with pytest.raises(SignalError, match="CLS token.*divprune, tome, random, uniform, pool, m3.*hiprune, visionzip:signal=attn_received"):
        vtc.apply(model, "vtc-cls:keep=16,layers=[0,1]")
    with pytest.raises(ConfigError, match="original"):
        vtc.apply(model, "pool:keep=16", position_ids="contiguous")
    with pytest.raises(ConfigError, match="merger"):
        vtc.apply(model, "mqt:keep=16")
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_the_adapter_exposes_the_decoder_rotary_and_cache(qwen_models, batches, family):
    """What the in-LLM stage builds on: layers, attention modules, M-RoPE cos/sin, the KV cache."""
    from vtc.integrations.adapters import adapter_for

    model, proc = qwen_models[family]
    ad = adapter_for(model)
    assert ad.family == "qwen_vl" and ad.vision_tower is model.model.visual and ad.projector is model.model.visual.merger
    assert ad.num_layers == 2 and ad.attention(1) is model.model.language_model.layers[1].self_attn
    assert ad.deepstack_layers == (1 if family == "qwen3_vl" else 0)
    seen = {}
    h = ad.decoder_layers[0].register_forward_pre_hook(lambda m, a, kw: seen.update(pe=kw["position_embeddings"]),
                                                        with_kwargs=True)
    batch = _batch(proc, *batches)
    try:
        out = model(**batch, use_cache=True)
    finally:
        h.remove()
    pos = ad.rope_index(batch)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    for ids in (pos, torch.cat([pos[:1], pos])):  # [3, B, L], and generate()'s [4, B, L]
        cos, sin = ad.position_embeddings(embeds, ids)
        assert torch.equal(cos, seen["pe"][0]) and torch.equal(sin, seen["pe"][1])
    keys, values = ad.cache_layer(ad.cache_out(out), 0)
    assert keys.shape[:3] == (2, model.config.text_config.num_key_value_heads, batch["input_ids"].shape[1])


@torch.no_grad()
def test_cls_free_signals_reach_the_operators_on_the_merged_grid(qwen_models, batches):
    """hiprune (attention received) through vtc.apply equals hiprune on the merged tokens with the
    signal of a tap opened by hand (summed over each 2x2 block); layer -1 resolves to the tower's last."""
    from vtc.taps import attach, to_merged_grid

    model, proc = qwen_models["qwen2_5_vl"]
    batch = _batch(proc, *batches)
    with vtc.apply(model, "hiprune:keep=8,object_layer=0,deep_layer=-1") as h:
        model(**batch)
    with attach(model.model.visual, {"attn_received": [0, 1]}) as tap:
        feats = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        sig = {l: [to_merged_grid(t, 2, "sum") for t in tap.per_image("attn_received", l)] for l in (0, 1)}
    tokens = vtc.VisualTokens.from_list(list(feats), layout=[vtc.Layout.grid(*g) for g in _grids(batch)],
                                        signals={"attn_received": sig})
    want = vtc.create("hiprune", keep=8, object_layer=0, deep_layer=1)(tokens).unbind_index()
    assert all(torch.equal(a, b) for a, b in zip(h.last.index, want))
