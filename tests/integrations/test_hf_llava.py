"""vtc.apply on stock Hugging Face LLaVA and LLaVA-NeXT (tiny random models, real photos)."""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.errors import ConfigError, InputError, SignalError, UnsupportedModelError

GEN = dict(max_new_tokens=5, do_sample=False)
# keeps everything: the operators run but every image fits its budget
KEEP_ALL = {"llava": "random:keep=144 | divprune:keep=144", "llava_next": "random:keep=3000 | divprune:keep=3000"}


def _hooks(model):
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


@torch.no_grad()
def test_keep_everything_is_the_unwrapped_model(setup):
    kind, model, _, batch, _ = setup
    ref = model(**batch).logits
    ref_gen = model.generate(**batch, **GEN)
    for spec in ("identity", KEEP_ALL[kind]):
        with vtc.apply(model, spec) as h:
            out = model(**batch)
            gen = model.generate(**batch, **GEN)
        assert torch.equal(out.logits, ref), spec
        assert torch.equal(gen, ref_gen), spec
        assert h.last.counts == h.last.stock_counts


@pytest.mark.parametrize("spec", ["divprune:keep=40", "random:keep=40", "tome:keep=40"])
@torch.no_grad()
def test_language_model_gets_k_tokens_equal_to_projector_outputs(setup, spec, lm_inputs, stock_projected):
    kind, model, _, batch, _ = setup
    stock = stock_projected(model, kind, batch)
    image_id = model.config.image_token_id
    with vtc.apply(model, spec) as h, lm_inputs(model) as rec:
        out = model(**batch)
    embeds = rec.calls[0]["inputs_embeds"]
    # which slots hold visual tokens: those whose original prompt position was a placeholder
    pos = h.last.positions
    was_image = (batch["input_ids"].gather(1, pos.clamp_min(0)) == image_id) & (pos >= 0)
    counts = was_image.sum(1)
    assert counts.tolist() == h.last.counts
    # the output reports the visual features the LM received, where stock reports its image features
    reported = out.image_outputs.pooler_output if hasattr(type(out), "image_outputs") else out.image_hidden_states
    torch.testing.assert_close(reported, embeds[was_image])
    if kind == "llava":
        assert h.last.counts == [40, 40, 40]
    got = embeds[was_image]
    want = torch.cat([s[i.clamp_max(s.shape[0] - 1)] for s, i in zip(stock, h.last.index)])
    if spec.startswith("tome"):  # merged tokens are size-weighted means: check the unmerged ones
        single = torch.cat([t == 1 for t in h.last.tokens.sizes[h.last.tokens.valid].split(h.last.counts)])
        assert single.any()
        got, want = got[single], want[single]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # text embeddings are the model's own
    text = embeds[~was_image & (pos >= 0)]
    ids = batch["input_ids"].gather(1, pos.clamp_min(0))[~was_image & (pos >= 0)]
    assert torch.equal(text, model.get_input_embeddings()(ids))


@pytest.mark.parametrize("stage,mode", [("vision", "contiguous"), ("llm", "original")])
@torch.no_grad()
def test_batch_with_different_kept_counts_equals_each_alone(setup, threshold, mode, stage):
    kind, model, _, batch, alone = setup
    pipe = vtc.build(threshold(stage=stage))
    with vtc.apply(model, pipe, position_ids=mode) as h:
        out = model(**batch)
        counts = h.last.counts
        h.last = None
        gen = model.generate(**batch, **GEN)
        assert h.last.counts == counts  # generate() compressed at its prefill
        singles = []
        for one in alone:
            o = model(**one)
            g = model.generate(**one, **GEN)
            singles.append((o.logits[0, -1], g[0, one["input_ids"].shape[1]:], h.last.counts[0]))
    assert len(set(counts)) == 3, counts  # three different kept counts in one batch
    L = batch["input_ids"].shape[1]
    for b, (logit, new, count) in enumerate(singles):
        assert counts[b] == count
        torch.testing.assert_close(out.logits[b, -1], logit, rtol=1e-4, atol=1e-5)
        # the same new tokens; a row that stopped early (EOS) is padded in the batch
        assert torch.equal(gen[b, L:L + len(new)], new)
        assert (gen[b, L + len(new):] == model.generation_config.pad_token_id).all()
        assert torch.equal(gen[b, :L], batch["input_ids"][b])  # stock-looking output: prompt ids + new tokens


@pytest.mark.parametrize("mode", ["contiguous", "original"])
@torch.no_grad()
def test_position_ids_during_prefill_and_decoding(llava, photos, mode, lm_inputs):
    model, proc = llava
    batch = proc(images=photos[:2], text=["<image> describe", "user : what color is the <image> ?"],
                 return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    L = mask.shape[1]
    with vtc.apply(model, "uniform:keep=16", position_ids=mode) as h, lm_inputs(model) as rec:
        model.generate(**batch, max_new_tokens=3, do_sample=False)
    pos = h.last.positions
    prefill = rec.calls[0]
    real = prefill["attention_mask"].bool()
    original = (mask.cumsum(1) - 1).gather(1, pos.clamp_min(0))  # generate's positions, at the kept slots
    if mode == "original":
        want = original
    else:
        want = prefill["attention_mask"].cumsum(1) - 1
    assert torch.equal(prefill["position_ids"][real], want[real])
    if mode == "original":  # gaps where the 560 dropped placeholders were
        assert int(prefill["position_ids"][real].max()) == int(mask.sum(1).max()) - 1
    for t, call in enumerate(rec.calls[1:]):
        n_real = mask.sum(1) + t
        expect = n_real if mode == "original" else n_real - (576 - 16)
        assert call["position_ids"][:, -1].tolist() == expect.tolist()
        assert call["attention_mask"].shape[1] == pos.shape[1] + t + 1  # the cache's length, not L + t + 1
    assert L > pos.shape[1]


@torch.no_grad()
def test_original_positions_without_cache_or_mask_are_one_sequence(llava, photos):
    """HF treats position gaps as packed sequences when there is neither a mask nor a cache."""
    model, proc = llava
    one = proc(images=photos[:1], text=["user : <image> what is this ?"], return_tensors="pt")
    one.pop("attention_mask")
    with vtc.apply(model, "uniform:keep=16", position_ids="original"):
        cached = model(**one, use_cache=True).logits
        uncached = model(**one, use_cache=False).logits
    torch.testing.assert_close(uncached, cached)


@torch.no_grad()
def test_manual_decoding_loop_with_the_original_length_mask(llava, photos):
    model, proc = llava
    batch = proc(images=photos[:2], text=["<image> describe", "what is the <image> ?"], return_tensors="pt",
                 padding=True)
    with vtc.apply(model, "pool:keep=36"):
        ref = model.generate(**batch, max_new_tokens=2, do_sample=False)
        mask = batch["attention_mask"]
        pos = (mask.cumsum(1) - 1).clamp_min(0)  # generate()'s positions
        out = model(**batch, position_ids=pos, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)  # over the ORIGINAL length
        pos = mask.sum(1, keepdim=True) - 1
        out2 = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values)
    L = batch["input_ids"].shape[1]
    assert torch.equal(ref[:, L], nxt[:, 0])
    assert torch.equal(ref[:, L + 1], out2.logits[:, -1].argmax(-1))


@torch.no_grad()
def test_labels_are_compacted_with_the_sequence(llava, photos):
    model, proc = llava
    batch = proc(images=photos[:1], text=["user : <image> what is this ? assistant : a photo"], return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    ref = model(**batch, labels=labels).loss
    with vtc.apply(model, "identity"):
        assert torch.equal(model(**batch, labels=labels).loss, ref)
    with vtc.apply(model, "divprune:keep=8") as h:
        out = model(**batch, labels=labels)
    lab = labels.gather(1, h.last.positions.clamp_min(0))
    want = torch.nn.functional.cross_entropy(out.logits[0, :-1], lab[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    assert out.logits.shape[1] == labels.shape[1] - (576 - 8)


@torch.no_grad()
@pytest.mark.parametrize("spec", ["pool:keep=16", "vtc-cls:keep=16,layers=[1,2]"])  # the second taps the tower
def test_remove_restores_the_model_and_is_per_instance(setup, spec):
    kind, model, _, _, alone = setup
    from vtc.models.random import random_llava, random_llava_next

    batch = alone[0]
    other, _ = (random_llava if kind == "llava" else random_llava_next)(patch_size=8)
    ref = model(**batch).logits  # first: transformers may register its own hooks at the first forward
    before_dict = dict(model.__dict__)
    before_hooks = _hooks(model)
    before_attrs = {name: dict(m.__dict__) for name, m in model.named_modules()}
    h = vtc.apply(model, spec)
    if spec.startswith("vtc-cls"):
        assert _hooks(model) != before_hooks  # the tap is attached while the handle is active
    assert "forward" in model.__dict__ and "forward" not in other.__dict__
    assert type(model).forward is type(other).forward  # the class is untouched
    assert model(**batch).logits.shape[1] < ref.shape[1]
    assert other(**batch).logits.shape == ref.shape
    h.remove()
    h.remove()  # idempotent
    assert model.__dict__.keys() == before_dict.keys()
    assert all(model.__dict__[k] is v for k, v in before_dict.items())
    assert _hooks(model) == before_hooks
    for name, m in model.named_modules():  # no module keeps a patched attribute
        assert m.__dict__.keys() == before_attrs[name].keys(), name
    assert torch.equal(model(**batch).logits, ref)
    with pytest.raises(ConfigError):
        h.check_active()


def test_apply_twice_is_refused(llava):
    model, _ = llava
    with vtc.apply(model, "pool:keep=16"):
        with pytest.raises(InputError, match="already active"):
            vtc.apply(model, "pool:keep=16")
    assert "forward" not in model.__dict__


def test_cls_signal_on_a_siglip_tower_is_a_clear_error():
    from vtc.models.random import random_llava

    model, _ = random_llava(tower="siglip")
    with pytest.raises(SignalError, match="no CLS token"):
        vtc.apply(model, "vtc-cls:keep=64,layers=[1,2]")
    assert "forward" not in model.__dict__
    with vtc.apply(model, "divprune:keep=64"):  # signal-free operators work on SigLIP
        pass


def test_unsupported_model_is_a_clear_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))
    for model in (llm, torch.nn.Linear(2, 2)):
        with pytest.raises(UnsupportedModelError, match="VisualCompressor"):
            vtc.apply(model, "divprune:keep=64")
        assert "forward" not in model.__dict__


@torch.no_grad()
def test_image_token_count_mismatch_is_a_clear_error(setup):
    kind, model, _, batch, _ = setup
    ids = batch["input_ids"].clone()
    image_id = model.config.image_token_id
    row, col = (ids == image_id).nonzero()[0].tolist()
    ids[row, col] = 5  # one placeholder fewer than the images need
    with vtc.apply(model, "pool:keep=16"):
        with pytest.raises(InputError, match="placeholder tokens"):
            model(**{**batch, "input_ids": ids})


def test_bad_options_are_clear_errors(llava):
    model, _ = llava
    with pytest.raises(ConfigError, match="position_ids"):
        vtc.apply(model, "pool:keep=16", position_ids="gaps")
    with pytest.raises(ConfigError, match="unknown option"):
        vtc.apply(model, "pool:keep=16", newlines="none")
    assert "forward" not in model.__dict__


@torch.no_grad()
def test_divprune_on_llava_next_picks_from_the_stock_assembled_sequence(small_models, photos, lm_inputs):
    """Official DivPrune runs on LLaVA-NeXT's assembled image features, newline tokens included."""
    model, proc = small_models["llava_next"]
    batch = proc(images=photos[:2], text=["<image> describe", "what is the <image> ?"], return_tensors="pt",
                 padding=True)
    stock = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    with vtc.apply(model, "divprune:keep=20") as h, lm_inputs(model) as rec:
        model(**batch)
    embeds = rec.calls[0]["inputs_embeds"]
    slots = batch["input_ids"].gather(1, h.last.positions.clamp_min(0)) == model.config.image_token_id
    for b, feats in enumerate(stock):
        want = vtc.create("divprune", keep=20)(vtc.VisualTokens(x=feats[None])).x[0]
        torch.testing.assert_close(embeds[b][slots[b]], want)


@pytest.mark.parametrize("mode", ["contiguous", "original"])
@torch.no_grad()
def test_generate_without_cache_and_with_beams(small_models, photos, mode):
    model, proc = small_models["llava"]
    batch = proc(images=photos[:2], text=["<image> describe", "what is the <image> ?"], return_tensors="pt",
                 padding=True)
    with vtc.apply(model, "divprune:keep=10", position_ids=mode) as h:
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
        beams = model.generate(**batch, max_new_tokens=4, do_sample=False, num_beams=3)
        assert h.last.counts == [10] * 6  # the beams' prefill was compressed too (2 images x 3 beams)
    assert torch.equal(cached, uncached)  # every no-cache step recompresses the full prompt
    assert beams.shape[0] == 2 and torch.equal(beams[:, : batch["input_ids"].shape[1]], batch["input_ids"])
