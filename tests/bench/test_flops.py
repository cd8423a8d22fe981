"""vtc.bench.flops against torch.utils.flop_counter.FlopCounterMode, plus hand-computed formulas.

Tiny random LLaVA / LLaVA-NeXT (CLIP and SigLIP towers) run for real on CPU with eager attention
(FlopCounterMode does not see CPU SDPA kernels); the LLaMA-7B-shaped LLM and the CLIP-L/336 tower
run on the meta device.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vtc
from vtc.bench import flops as F


def _counted(fn):
    fc = FlopCounterMode(display=False)
    with torch.no_grad(), fc:
        fn()
    return fc


def _by_prefix(fc, suffix):
    return sum(sum(v.values()) for k, v in fc.get_flop_counts().items() if k.endswith(suffix) and k.count(".") <= 2)


def _tiny_check(model, proc, size):
    from PIL import Image

    model.set_attn_implementation("eager")
    inputs = proc(images=[Image.new("RGB", size, (10, 200, 30))], text=["USER: <image>\nwhat color ASSISTANT:"],
                  return_tensors="pt")
    fc = _counted(lambda: model(**inputs))
    shape = F.ModelShape.from_config(model.config)
    n = inputs["input_ids"].shape[1]
    passes = 1
    if "image_sizes" in inputs:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        passes = image_size_to_num_patches(inputs["image_sizes"][0].tolist(), model.config.image_grid_pinpoints,
                                           model.config.vision_config.image_size)
    vision = F.vision_flops(shape.vision, passes)
    proj = F.projector_flops(shape, shape.vision.patches * passes)
    lm = F.prefill_flops(shape.lm, n, logits=n)  # a plain forward computes logits at every position
    assert vision == pytest.approx(_by_prefix(fc, ".vision_tower"), rel=0.01)
    assert proj == pytest.approx(_by_prefix(fc, ".multi_modal_projector"), rel=0.01)
    assert vision + proj + lm == pytest.approx(fc.get_total_flops(), rel=0.01)
    return passes


def test_tiny_llava_clip_and_siglip():
    from vtc.models.random import random_llava

    _tiny_check(*random_llava(vision_layers=2), (64, 64))
    _tiny_check(*random_llava(vision_layers=2, tower="siglip"), (64, 64))


def test_tiny_llava_next_anyres():
    from vtc.models.random import random_llava_next

    passes = _tiny_check(*random_llava_next(vision_layers=2), (150, 64))
    assert passes == 3  # base + a 1x2 crop grid


def test_decode_step_with_kv_cache():
    from vtc.models.random import random_llava

    model, _ = random_llava(vision_layers=1)
    lm_model = model.model.language_model
    lm_model.config._attn_implementation = "eager"
    lm = F.ModelShape.from_config(model.config).lm
    n = 40
    with torch.no_grad():
        out = lm_model(inputs_embeds=torch.randn(1, n, lm.hidden), use_cache=True)
    step = torch.randn(1, 1, lm.hidden)
    fc = _counted(lambda: model.lm_head(lm_model(inputs_embeds=step, past_key_values=out.past_key_values).last_hidden_state))
    # decode_flops(prompt=n, new_tokens=2) is exactly one step over a cache of n + 1 tokens
    assert F.decode_flops(lm, n, 2) == pytest.approx(fc.get_total_flops(), rel=0.01)
    assert F.decode_flops(lm, n, 1) == 0


def test_llama_7b_shape_on_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    n = 35 + 576 + 20
    ids = torch.zeros(1, n, dtype=torch.long, device="meta")
    fc = _counted(lambda: model(input_ids=ids, logits_to_keep=1))
    lm = F.ModelShape.from_config(cfg).lm
    assert F.prefill_flops(lm, n, logits=1) == pytest.approx(fc.get_total_flops(), rel=0.01)
    # grouped-query attention: 8 KV heads shrink k/v projections and nothing else
    gqa = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                      num_attention_heads=32, num_key_value_heads=8)
    with torch.device("meta"):
        small = LlamaForCausalLM(gqa)
    fc = _counted(lambda: small(input_ids=ids, logits_to_keep=1))
    assert F.prefill_flops(F.ModelShape.from_config(gqa).lm, n, 1) == pytest.approx(fc.get_total_flops(), rel=0.01)


def test_clip_l_336_tower_on_meta():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=336, patch_size=14)
    with torch.device("meta"):
        tower = CLIPVisionModel(vc)
    fc = _counted(lambda: tower(torch.zeros(1, 3, 336, 336, device="meta"), output_hidden_states=True))
    v = F.ModelShape.from_config(vc).vision
    assert v.seq == 577
    assert F.vision_flops(v) == pytest.approx(fc.get_total_flops(), rel=0.01)


def test_fastv_formula_and_kv_cache_by_hand():
    lm = F.LMShape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128, vocab=32000)
    n, d, m = 611, 4096, 11008
    assert F.fastv_compat(lm, n) == 32 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
    assert F.kv_cache_bytes(lm, 100, 2) == 2 * 32 * 32 * 128 * 100 * 2  # K and V, fp16


def test_estimate_with_a_pipeline():
    v = F.VisionShape(layers=24, hidden=1024, intermediate=4096, image_size=336, patch_size=14, heads=16,
                      feature_layer=22)
    lm = F.LMShape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128, vocab=32000)
    shape = F.ModelShape(vision=v, projector=((1024, 4096), (4096, 4096)), lm=lm)
    base = F.estimate(shape, text_tokens=55, kept_tokens=576, new_tokens=4)
    assert base["ops"] == 0 and base["projector"] == 2 * 576 * (1024 * 4096 + 4096 * 4096)
    assert base["total"] == sum(base[k] for k in ("vision", "projector", "ops", "prefill", "decode"))
    # divprune at the LLM stage on 576 tokens: the cosine matrix 2·n²·d plus normalisation 2·n·d
    pipe = vtc.build("divprune:keep=64")
    pruned = F.estimate(shape, text_tokens=55, kept_tokens=64, new_tokens=4, pipeline=pipe, visual_tokens=576)
    assert pruned["ops"] == 2 * 576 * 576 * 4096 + 2 * 576 * 4096
    assert pruned["prefill"] == F.prefill_flops(lm, 55 + 64, 1) < base["prefill"]
    assert pruned["projector"] == base["projector"]  # an llm-stage op runs after the projector
    # a vision-stage op shrinks what the projector sees and adds its taps' CLS-row products: layers 16..22,
    # each one [577, 1024] x [1024, 16] product (the 16 heads' queries in one block-diagonal matrix)
    cls = vtc.build("vtc-cls:keep=64")
    early = F.estimate(shape, text_tokens=55, kept_tokens=64, new_tokens=4, pipeline=cls)
    assert early["projector"] == 2 * 64 * (1024 * 4096 + 4096 * 4096)
    assert early["ops"] == 7 * 2 * 577 * 1024 * 16 + 576 * len(cls.requires["cls_attn"])
    with pytest.raises(vtc.errors.ConfigError, match="feature"):  # a shape that does not know its feature layer
        F.estimate(F.ModelShape(vision=F.VisionShape(**{**v.__dict__, "feature_layer": None}),
                                projector=shape.projector, lm=lm), text_tokens=55, kept_tokens=64, new_tokens=4,
                   pipeline=cls)


def test_operator_may_report_its_own_flops():
    pipe = vtc.build("random:keep=10")
    op = pipe[0]
    assert F.op_flops(op, 100, 8) == (0, 10, True)
    op.flops = lambda n, d, p: (123, 7)
    assert F.op_flops(op, 100, 8) == (123, 7, True)
    del op.flops
    type(op).name, saved = "no-such-estimate", type(op).name
    try:
        assert F.op_flops(op, 100, 8) == (0, 10, False)
    finally:
        type(op).name = saved


def test_operator_budget_defaults_to_its_own_default_ratio():
    """HiRED with no keep=/ratio= keeps int(0.2 n), so later stages are costed on that, not on n."""
    n_out = F.op_flops(vtc.build("hired")[0], 2880, 8, 5)[1]
    assert n_out == F.op_flops(vtc.build("hired:ratio=0.2")[0], 2880, 8, 5)[1] == 576


def test_layer_varying_counts_match_flop_counter_on_a_layer_by_layer_llama_run():
    """In-LLM pruning: a 4-layer random Llama (GQA) run layer by layer, visual tokens dropped between
    layers as PyramidDrop's schedule says; prefill, one decode step on the per-layer KV cache, and the
    cache bytes equal the analytic per-layer model."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")
    inner = model.model
    lm = F.ModelShape.from_config(cfg).lm
    sys_len, vis, txt = 5, 48, 7
    pipe = vtc.build("pdrop:layers=[0,1,2],ratios=[0.5,0.25,0.125]")
    counts = F.layer_visual_counts(pipe, vis, lm.layers)
    assert counts == [48, 24, 12, 6]
    cache = DynamicCache(config=cfg)
    h0 = torch.randn(1, sys_len + vis + txt, lm.hidden)

    def prefill():
        h, pos = h0, torch.arange(h0.shape[1])
        for layer, block in enumerate(inner.layers):
            L = h.shape[1]
            mask = torch.full((L, L), float("-inf")).triu(1).view(1, 1, L, L)
            h = block(h, attention_mask=mask, position_ids=pos[None], cache=cache, use_cache=True,
                      position_embeddings=inner.rotary_emb(h, pos[None]))
            if layer + 1 < lm.layers:  # keep the first counts[layer + 1] visual tokens, all text
                keep = torch.cat([torch.arange(sys_len), sys_len + torch.arange(counts[layer + 1]),
                                  torch.arange(sys_len + counts[layer], L)])
                h, pos = h[:, keep], pos[keep]
        model.lm_head(inner.norm(h[:, -1:]))
        return int(pos[-1])

    fc = FlopCounterMode(display=False)
    with torch.no_grad(), fc:
        last = prefill()
    layer_tokens = [sys_len + txt + c for c in counts]
    assert [cache.layers[l].keys.shape[2] for l in range(lm.layers)] == layer_tokens
    n = sys_len + vis + txt
    assert F.prefill_flops(lm, n, 1, layer_tokens) == pytest.approx(fc.get_total_flops(), rel=0.01)
    assert F.prefill_flops(lm, n, 1, layer_tokens) < 0.8 * F.prefill_flops(lm, n, 1)

    def step():
        h, pos = torch.randn(1, 1, lm.hidden), torch.tensor([[last + 1]])
        for block in inner.layers:
            h = block(h, attention_mask=None, position_ids=pos, cache=cache, use_cache=True,
                      position_embeddings=inner.rotary_emb(h, pos))
        model.lm_head(inner.norm(h))

    fc = FlopCounterMode(display=False)
    with torch.no_grad(), fc:
        step()
    assert F.decode_flops(lm, n, 2, layer_tokens) == pytest.approx(fc.get_total_flops(), rel=0.01)
    cached = sum(cache.layers[l].keys.numel() + cache.layers[l].values.numel() for l in range(lm.layers)) * 4
    assert F.kv_cache_bytes(lm, n + 1, 4, [t + 1 for t in layer_tokens]) == cached

    # estimate() predicts the same per-layer counts from the pipeline and reports equivalent tokens
    shape = F.ModelShape(vision=None, projector=(), lm=lm)
    est = F.estimate(shape, text_tokens=sys_len + txt, kept_tokens=vis, new_tokens=2, pipeline=pipe, dtype_bytes=4)
    assert est["layer_visual"] == counts and est["equivalent_tokens"] == sum(counts) / 4
    assert est["prefill"] == F.prefill_flops(lm, n, 1, layer_tokens)
    assert est["decode"] == F.decode_flops(lm, n, 2, layer_tokens)
    assert est["kv_cache_bytes"] == cached
    assert est["ops"] == 2 * lm.heads * lm.head_dim * (60 + 36 + 24)  # one attention row per pruning layer
    assert est["fastv_compat"] == F.fastv_compat(lm, n, layer_tokens) < F.fastv_compat(lm, n)
    plain = F.estimate(shape, text_tokens=sys_len + txt, kept_tokens=vis, new_tokens=2)
    assert plain["equivalent_tokens"] == vis and "layer_visual" not in plain


def test_fastv_formula_with_in_llm_pruning_and_equivalent_tokens():
    lm = F.LMShape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128, vocab=32000)
    shape = F.ModelShape(vision=None, projector=(), lm=lm)
    text, d, m = 55, 4096, 11008

    def term(t):
        return 4 * t * d * d + 2 * t * t * d + 2 * t * d * m

    est = F.estimate(shape, text_tokens=text, kept_tokens=576, new_tokens=1, pipeline=vtc.build("fastv:K=2,R=0.5"))
    # FastV's own figure: FLOPs(n, K layers) + FLOPs(n', T - K layers)
    assert est["fastv_compat"] == 2 * term(text + 576) + 30 * term(text + 288)
    assert est["equivalent_tokens"] == (2 * 576 + 30 * 288) / 32
    # SparseVLM's "equivalent 192": the 192 preset averages 206.5 visual tokens with vtc's after-layer drops
    sv = F.estimate(shape, text_tokens=text, kept_tokens=576, new_tokens=1, pipeline=vtc.build("sparsevlm"))
    assert sv["layer_visual"][:4] == [576, 576, 576, 309] and sv["equivalent_tokens"] == (3 * 576 + 4 * 309 + 9 * 204 + 16 * 113) / 32
    pd = F.estimate(shape, text_tokens=text, kept_tokens=576, new_tokens=1, pipeline=vtc.build("pdrop"))
    assert pd["equivalent_tokens"] == (9 * 576 + 8 * 288 + 8 * 144 + 7 * 72) / 32
    with pytest.raises(vtc.VtcError, match="32 layers"):
        F.prefill_flops(lm, 10, 1, [10] * 4)


@pytest.mark.parametrize("spec", ["fastv:K=1,R=0.75", "tome:keep=288 | pdrop:layers=[0,1,2],ratios=[0.5,0.25,0.125]"])
def test_in_llm_pruning_through_vtc_apply_matches_flop_counter(spec):
    """A real vtc.apply prefill (tiny random LLaVA, 4-layer decoder, eager attention so FlopCounterMode
    sees it) costs what estimate() says with the per-layer visual counts the integration measured:
    tower, projector, the operators' attention rows and each decoder layer at its own token count."""
    from PIL import Image

    from vtc.models.random import random_llava

    model, proc = random_llava(vision_layers=2, text_layers=4)
    model.set_attn_implementation("eager")
    inputs = proc(images=[Image.new("RGB", (64, 64), (10, 200, 30))], text=["USER: <image>\nwhat color ASSISTANT:"],
                  return_tensors="pt")
    pipe = vtc.build(spec)
    with vtc.apply(model, pipe) as h:
        fc = _counted(lambda: model(**inputs, logits_to_keep=1))
    measured = h.last.extra["layer_visual"][0]
    shape = F.ModelShape.from_config(model.config)
    text = inputs["input_ids"].shape[1] - 576
    est = F.estimate(shape, text_tokens=text, kept_tokens=h.last.counts[0], new_tokens=1, pipeline=pipe,
                     layer_visual=measured)
    assert measured == F.layer_visual_counts(pipe, h.last.counts[0], 4) and measured[-1] < measured[0]
    in_llm = sum(F.layer_op_flops(op, shape.lm, text, measured[layer])
                 for layer, ops in pipe.layer_schedule(4).items() for op in ops)
    assert in_llm > 0 and (est["ops"] > in_llm) == spec.startswith("tome")  # ToMe's matching counts too
    assert est["total"] == pytest.approx(fc.get_total_flops(), rel=0.01)
    assert est["prefill"] < F.prefill_flops(shape.lm, text + h.last.counts[0])
