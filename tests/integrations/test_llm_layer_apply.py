"""In-LLM operators (fastv, pdrop, aim, sparsevlm, router) through vtc.apply on stock models.

Tiny random models (fp32, CPU, 4-layer decoders, SDPA): LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL,
Qwen3-VL. The kept visual tokens after every layer equal a brute-force reference that walks the
stock decoder layers of an eager-attention copy one sample at a time, reads each layer's FULL
softmax map and applies the method's rule (tests/integrations/_llm_reference.py), index-exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _llm_reference import aim_rule, eager_copy, language_inputs, last_row_rule, run, sparsevlm_rule

import vtc
from vtc.errors import ConfigError, InputError
from vtc.integrations.adapters import adapter_for

LLAVA_PROMPTS = ["user : <image> what is this ? assistant :", "<image> describe the picture", "what color is the <image> ?"]
NO_OP = ["fastv:R=0", "pdrop:ratios=[1.0,1.0,1.0]", "aim:start=1,step=0"]


def _trained_scale(pair, factor=50.0):
    """Input embeddings of unit scale, as in trained LLMs (random init gives 0.02, where DPC-kNN's
    densities all round to 1.0 in fp32 and every recycling decision would be a tie)."""
    model, proc = pair
    adapter = adapter_for(model)
    last = [m for m in adapter.projector.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        for p in (model.get_input_embeddings().weight, last.weight, last.bias,
                  getattr(model.model, "image_newline", None)):
            if p is not None:
                p.mul_(factor)
    return model, proc


@pytest.fixture(scope="module")
def models():
    from vtc.models import random as R

    return {"llava": _trained_scale(R.random_llava(text_layers=4, patch_size=8)),
            "llava_next": _trained_scale(R.random_llava_next(text_layers=4, patch_size=8)),
            "qwen2_5_vl": _trained_scale(R.random_qwen2_5_vl(text_layers=4))}


@pytest.fixture(scope="module")
def qwen_images():
    rng = np.random.default_rng(1)
    from PIL import Image

    return [Image.fromarray((rng.random(s) * 255).astype("uint8")) for s in ((48, 64, 3), (40, 40, 3), (64, 32, 3))]


def _qwen_prompts(n):
    from vtc.models.random import QWEN_IMAGE as IMG

    return [f"user : {IMG} what is this ? assistant :", f"{IMG} describe the picture", f"what color is the {IMG} ?"][:n]


def _inputs(kind, proc, images, n, photos):
    """(batch, per-sample inputs) for ``n`` prompts with one image each (left padded)."""
    if kind.startswith("qwen"):
        texts, ims = _qwen_prompts(n), images[:n]
    else:
        texts, ims = LLAVA_PROMPTS[:n], photos[:n]
    batch = proc(images=ims, text=texts, return_tensors="pt", padding=True)
    alone = [proc(images=[im], text=[t], return_tensors="pt") for im, t in zip(ims, texts)]
    return batch, alone


def _image_id(model):
    return adapter_for(model).image_token_id


# ---------------------------------------------------------------------------------------- nothing pruned
@pytest.mark.parametrize("kind", ["llava", "llava_next", "qwen2_5_vl"])
@torch.no_grad()
def test_keeping_everything_is_bit_identical_to_stock(models, photos, qwen_images, kind):
    model, proc = models[kind]
    batch, _ = _inputs(kind, proc, qwen_images, 2, photos)
    ref = model(**batch).logits
    ref_gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    for spec in NO_OP:
        with vtc.apply(model, spec) as h:
            out = model(**batch).logits
            gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert torch.equal(out, ref), spec
        assert torch.equal(gen, ref_gen), spec
        n = h.last.counts[0]
        assert h.last.extra["layer_visual"][0] == [n] * 4


# ---------------------------------------------------------------------------------------- brute force
def _rules(method, n_layers, embeds):
    if method == "fastv":
        return "fastv:K=2,R=0.5", {1: last_row_rule(lambda l, n, n_in: int(0.5 * n))}, "original"
    if method == "pdrop":
        ratios = {1: 0.5, 2: 0.25, 3: 0.125}
        rule = last_row_rule(lambda l, n, n_in: min(n, int(ratios[l] * n_in)))
        return "pdrop", dict.fromkeys(ratios, rule), "original"
    if method == "aim":
        rule = aim_rule(1, 0.3)
        return "aim:start=1,step=0.3", dict.fromkeys((1, 2, 3), rule), "original"
    if method == "sparsevlm":
        return "sparsevlm:layers=[0,1,2],counts=[40,20,9]", None, "contiguous"
    raise AssertionError(method)


@pytest.mark.parametrize("kind,method", [
    ("llava", "fastv"), ("llava", "pdrop"), ("llava", "aim"), ("llava", "sparsevlm"),
    ("llava_next", "fastv"), ("llava_next", "pdrop"), ("llava_next", "aim"), ("llava_next", "sparsevlm"),
    ("qwen2_5_vl", "fastv"), ("qwen2_5_vl", "pdrop"), ("qwen2_5_vl", "aim"), ("qwen2_5_vl", "sparsevlm"),
])
@torch.no_grad()
def test_kept_tokens_equal_a_full_eager_attention_reference(models, photos, qwen_images, kind, method):
    """Batched (left padding, different prompts), vtc keeps exactly what the per-sample full-eager
    reference keeps after every layer, and the first generated token's logits agree."""
    model, proc = models[kind]
    batch, alone = _inputs(kind, proc, qwen_images, 2, photos)
    spec, schedule, policy = _rules(method, 4, None)
    if kind.startswith("qwen") and policy == "contiguous":
        policy = "original"  # not told one, SparseVLM takes M-RoPE's only mode (see the test below)
    with vtc.apply(model, spec) as h:
        out = model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        kept = h.last.extra["layer_kept"]
    ref_model = eager_copy(model)
    for b, one in enumerate(alone):
        seen = language_inputs(model, one)
        image = one["input_ids"][0] == _image_id(model)
        rules = schedule
        if method == "sparsevlm":
            rules = dict.fromkeys((0, 1, 2), sparsevlm_rule([0, 1, 2], [40, 20, 9], seen["inputs_embeds"][0]))
        alive, logits = run(ref_model, seen, image, rules, policy)
        if method == "fastv":  # the walk's first decision is the one HF's own output_attentions gives
            att = ref_model(**one, output_attentions=True).attentions[1][0, :, -1].mean(0)  # layer K-1 = 1
            vis = torch.nonzero(image).flatten().tolist()
            top = sorted(sorted(range(len(vis)), key=lambda j: (-float(att[vis[j]]), j))[: len(vis) // 2])
            assert alive[1] == top
        for layer in sorted(kept):
            assert kept[layer][b].tolist() == alive[layer], (b, layer)
        assert h.last.extra["layer_visual"][b][1:] == [len(a) for a in alive[:-1]]
        torch.testing.assert_close(out.logits[0][b], logits, rtol=1e-4, atol=1e-4)
    if method == "sparsevlm":  # recycled cluster tokens were inserted
        assert any(len(v) > 40 for v in (k.tolist() for k in kept[0]))


# ---------------------------------------------------------------------------------------- batch, cache, beams
SPECS = ["fastv:K=1,R=0.6", "pdrop", "aim:start=1,step=0.3", "sparsevlm:layers=[0,1,2],counts=[40,20,9]",
         "tome:keep=64 | fastv:K=2,R=0.5"]


@pytest.mark.parametrize("spec", SPECS)
@torch.no_grad()
def test_batch_equals_each_alone_and_cached_equals_uncached(models, photos, spec):
    model, proc = models["llava"]
    batch, alone = _inputs("llava", proc, None, 3, photos)
    L = batch["input_ids"].shape[1]
    gen_kw = dict(max_new_tokens=4, do_sample=False)
    with vtc.apply(model, spec) as h:
        out = model.generate(**batch, **gen_kw, output_logits=True, return_dict_in_generate=True)
        visual, kept = h.last.extra["layer_visual"], h.last.extra["layer_kept"]
        uncached = model.generate(**batch, **gen_kw, use_cache=False, output_logits=True, return_dict_in_generate=True)
        # every step without a cache re-runs the prompt: the generated tokens do not steer the operators
        assert h.last.extra["layer_visual"] == visual
        assert {l: [t.tolist() for t in v] for l, v in h.last.extra["layer_kept"].items()} == \
            {l: [t.tolist() for t in v] for l, v in kept.items()}
        for b, one in enumerate(alone):
            mine = model.generate(**one, **gen_kw, output_logits=True, return_dict_in_generate=True)
            assert h.last.extra["layer_visual"][0] == visual[b]
            n = one["input_ids"].shape[1]
            assert torch.equal(out.sequences[b, L:], mine.sequences[0, n:])
            for step, logits in enumerate(mine.logits):
                torch.testing.assert_close(out.logits[step][b], logits[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.sequences, uncached.sequences)
    for a, b in zip(out.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if spec.startswith("tome"):
        assert h.last.counts == [64] and visual[0] == [64, 64, 32, 32]


@pytest.mark.parametrize("kind", ["llava", "qwen2_5_vl"])
@torch.no_grad()
def test_each_layer_caches_the_tokens_it_processed(models, photos, qwen_images, kind):
    model, proc = models[kind]
    batch, _ = _inputs(kind, proc, qwen_images, 2, photos)
    new = 3
    with vtc.apply(model, "pdrop") as h:
        out = model.generate(**batch, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    mask = batch["attention_mask"]
    image = (batch["input_ids"] == _image_id(model)) & mask.bool()
    text = (mask.bool() & ~image).sum(1)
    per_layer = torch.tensor(h.last.extra["layer_visual"])  # [B, layers]
    assert per_layer[:, 0].tolist() == image.sum(1).tolist()
    for layer in range(4):
        want = int((text + per_layer[:, layer]).max()) + new - 1  # the batch is padded to its longest row
        assert cache.layers[layer].keys.shape[-2] == want, layer
    assert per_layer.tolist() == [[n, n, n // 2, n // 4] for n in image.sum(1).tolist()]  # pdrop after 1, 2, 3


@torch.no_grad()
def test_beam_search_equals_each_sample_alone(models, photos):
    model, proc = models["llava"]
    batch, alone = _inputs("llava", proc, None, 2, photos)
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=2)
    L = batch["input_ids"].shape[1]
    with vtc.apply(model, "fastv:K=1,R=0.75") as h:
        beams = model.generate(**batch, **kw)
        assert len(h.last.extra["layer_visual"]) == 4  # 2 prompts x 2 beams
        for b, one in enumerate(alone):
            mine = model.generate(**one, **kw)
            assert torch.equal(beams[b, L:], mine[0, one["input_ids"].shape[1]:])


# ---------------------------------------------------------------------------------------- the other families
def _no_op_batch_and_cache(model, batch, alone, spec, layer_visual):
    """Keep-all generates as stock; with ``spec`` the per-layer counts are ``layer_visual(n)`` for each
    row's ``n`` visual tokens, cached equals uncached, and the batch equals each sample alone."""
    L = batch["input_ids"].shape[1]
    kw = dict(max_new_tokens=3, do_sample=False)
    ref = model.generate(**batch, **kw)
    with vtc.apply(model, "fastv:R=0"):
        assert torch.equal(model.generate(**batch, **kw), ref)
    with vtc.apply(model, spec) as h:
        gen = model.generate(**batch, **kw)
        n = h.last.counts
        assert h.last.extra["layer_visual"] == [layer_visual(c) for c in n] and n[0] != n[1]
        assert torch.equal(gen, model.generate(**batch, **kw, use_cache=False))
        for b, one in enumerate(alone):
            assert torch.equal(gen[b, L:], model.generate(**one, **kw)[0, one["input_ids"].shape[1]:])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
@torch.no_grad()
def test_qwen2_and_qwen3_batch_cache_and_no_op(qwen_images, family):
    from vtc.models import random as R

    model, proc = getattr(R, f"random_{family}")(text_layers=4)
    batch, alone = _inputs(family, proc, qwen_images, 2, None)
    _no_op_batch_and_cache(model, batch, alone, "fastv:K=1,R=0.5 | pdrop:layers=[2],ratios=[0.2]",
                           lambda c: [c, c // 2, c // 2, int(c * 0.2)])


@torch.no_grad()
def test_qwen3_deepstack_follows_the_dropped_tokens(qwen_images):
    """With DeepStack features added after layers 0 and 1, tokens dropped after layer 0 get no layer-1
    feature: equal to the reference walk that adds them to the surviving visual tokens only."""
    from vtc.models import random as R

    base, proc = R.random_qwen3_vl(text_layers=4)
    cfg = base.config
    cfg.vision_config.deepstack_visual_indexes = [0, 1]
    torch.manual_seed(0)
    model = type(base)(cfg).eval()
    batch, alone = _inputs("qwen3_vl", proc, qwen_images, 2, None)
    with vtc.apply(model, "fastv:K=1,R=0.5") as h:
        out = model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        kept = h.last.extra["layer_kept"][0]
    ref_model = eager_copy(model)
    for b, one in enumerate(alone):
        seen = language_inputs(model, one)
        assert len(seen["deepstack_visual_embeds"]) == 2
        image = one["input_ids"][0] == _image_id(model)
        alive, logits = run(ref_model, seen, image, {0: last_row_rule(lambda l, n, n_in: int(0.5 * n))})
        assert kept[b].tolist() == alive[0]
        torch.testing.assert_close(out.logits[0][b], logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- router, errors, removal
@torch.no_grad()
def test_a_learned_router_runs_like_any_in_llm_operator(models, photos):
    model, proc = models["llava"]
    batch, _ = _inputs("llava", proc, None, 2, photos)
    op = vtc.create("router", dim=model.config.text_config.hidden_size, layers=[1], ratios=[0.25])
    with vtc.apply(model, op) as h:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    n = h.last.counts[0]
    # the untrained (zero) router ties every token: the first quarter stays
    assert [k.tolist() for k in h.last.extra["layer_kept"][1]] == [list(range(n // 4))] * 2


@torch.no_grad()
def test_refusals_and_removal(models, photos, qwen_images):
    model, proc = models["qwen2_5_vl"]
    with pytest.raises(ConfigError, match="position_ids='original'"):
        vtc.apply(model, "sparsevlm:layers=[0,1,2],position_ids=contiguous")
    with pytest.raises(ConfigError, match="does not exist"):
        vtc.apply(model, "pdrop:layers=[1,2,9],ratios=[0.5,0.3,0.1]")
    llava, proc = models["llava"]
    batch, _ = _inputs("llava", proc, None, 1, photos)
    layers = llava.model.language_model.layers
    attn = layers[1].self_attn
    before = dict(attn.__dict__)
    with vtc.apply(llava, "fastv:K=2"):
        assert attn.config._attn_implementation == "vtc_capture"
        assert llava.config.text_config._attn_implementation == "sdpa"  # the model's own config is untouched
        with pytest.raises(InputError, match="static"):
            llava.generate(**batch, max_new_tokens=2, cache_implementation="static")
    assert attn.__dict__ == before and attn.config is llava.config.text_config
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in layers)


@torch.no_grad()
def test_right_padding_labels_and_logits_on_the_compacted_positions(models, photos):
    """A right-padded forward (scoring) prunes per row as each prompt alone does; the logits come back
    on the positions the language model received (handle.last.positions), so labels still line up."""
    model, proc = models["llava"]
    proc.tokenizer.padding_side = "right"
    try:
        batch, alone = _inputs("llava", proc, None, 3, photos)
    finally:
        proc.tokenizer.padding_side = "left"
    mask = batch["attention_mask"]
    assert not bool(mask[:, -1].all())  # right padded
    with vtc.apply(model, "pdrop") as h:
        out = model(**batch, labels=batch["input_ids"])
        assert out.logits.shape[:2] == h.last.positions.shape and torch.isfinite(out.loss)
        visual, last = h.last.extra["layer_visual"], mask.sum(1) - 1
        for b, one in enumerate(alone):
            mine = model(**one).logits[0, -1]
            assert h.last.extra["layer_visual"][0] == visual[b]
            torch.testing.assert_close(out.logits[b, last[b]], mine, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_llava_onevision_batch_cache_and_no_op(photos):
    """LLaVA-OneVision (a Qwen2 decoder after a SigLIP tower, packed AnyRes grids) runs in-LLM operators
    like LLaVA-NeXT: keep-all is stock, a batch equals each sample alone, cached equals uncached."""
    from vtc.models.random import random_llava_onevision

    model, proc = random_llava_onevision(text_layers=4, patch_size=8)
    batch, alone = _inputs("llava_onevision", proc, None, 2, photos)
    _no_op_batch_and_cache(model, batch, alone, "pdrop", lambda c: [c, c, c // 2, c // 4])


@torch.no_grad()
def test_sparsevlm_on_qwen_keeps_original_ids_unless_told_to_renumber(models, qwen_images):
    """SparseVLM's official renumbering is undefined for M-RoPE's 3-D ids: by default it runs with the
    original ids on Qwen (the same picks as asking for them), and asking for renumbering is refused."""
    model, proc = models["qwen2_5_vl"]
    batch, _ = _inputs("qwen2_5_vl", proc, qwen_images, 2, None)
    spec = "sparsevlm:layers=[0,1,2],counts=[40,20,9]"
    runs = []
    for s in (spec, spec + ",position_ids=original"):
        with vtc.apply(model, s) as h:
            out = model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            kept = {layer: [k.tolist() for k in rows] for layer, rows in h.last.extra["layer_kept"].items()}
            runs.append((out.logits[0], kept))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    with pytest.raises(ConfigError, match="position_ids='original'"):
        with vtc.apply(model, spec + ",position_ids=contiguous"):
            model(**batch)
