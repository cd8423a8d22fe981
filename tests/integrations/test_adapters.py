"""The ModelAdapter contract: registry, parts, rotary positions, the KV cache, FLOPs shapes."""

from __future__ import annotations

import pytest
import torch

from vtc.bench.flops import ModelShape
from vtc.errors import ConfigError, UnsupportedModelError
from vtc.integrations.adapters import adapter_class_for_config, adapter_for, families


@pytest.fixture(scope="module")
def models(small_models):
    return {k: m for k, (m, _) in small_models.items()}


def test_the_adapter_comes_from_the_model_class(models):
    assert adapter_for(models["llava"]).family == "llava"
    assert adapter_for(models["llava_next"]).family == "llava_next"
    assert adapter_class_for_config(models["llava_next"].config).family == "llava_next"
    names = [f for f, _ in families()]
    assert {"llava", "llava_next"} <= set(names)


def test_an_unsupported_model_lists_the_families():
    with pytest.raises(UnsupportedModelError) as err:
        adapter_for(torch.nn.Linear(2, 2))
    msg = str(err.value)
    for fam, classes in families():
        assert fam in msg and classes[0] in msg


def test_parts_are_the_model_modules(models):
    for model in models.values():
        ad = adapter_for(model)
        assert ad.vision_tower is model.model.vision_tower
        assert ad.projector is model.model.multi_modal_projector
        assert ad.language_model is model.model.language_model
        assert ad.num_layers == model.config.text_config.num_hidden_layers
        assert ad.attention(1) is model.model.language_model.layers[1].self_attn
        assert ad.lm_head is model.lm_head
        assert ModelShape.from_model(model) == ModelShape.from_config(model.config)


@torch.no_grad()
def test_position_embeddings_and_cache_are_what_the_decoder_uses(models):
    model = models["llava"]
    ad = adapter_for(model)
    seen = {}

    def grab(_m, _args, kwargs):
        seen["pe"] = kwargs["position_embeddings"]

    h = ad.decoder_layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        embeds = torch.randn(2, 7, ad.text_width)
        pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 3, 4, 5]])
        out = ad.language_model(inputs_embeds=embeds, position_ids=pos, use_cache=True)
    finally:
        h.remove()
    cos, sin = ad.position_embeddings(embeds, pos)
    assert torch.equal(cos, seen["pe"][0]) and torch.equal(sin, seen["pe"][1])
    keys, values = ad.cache_layer(ad.cache_out(out), 1)
    cfg = model.config.text_config
    assert keys.shape == (2, cfg.num_key_value_heads, 7, cfg.hidden_size // cfg.num_attention_heads)
    assert values.shape == keys.shape and ad.cache_length(ad.cache_out(out)) == 7


def test_rebuilt_positions_keep_each_surviving_token_id():
    from vtc.integrations.adapters.base import ModelAdapter

    pos = torch.tensor([[10, 11, 12, 13], [0, 1, 2, 3]])
    src = torch.tensor([[0, 2, 3], [1, 3, 3]])
    assert ModelAdapter.rebuild_positions(pos, src).tolist() == [[10, 12, 13], [1, 3, 3]]
    mrope = torch.stack([pos, pos + 100, pos + 200])  # [3, B, L]
    out = ModelAdapter.rebuild_positions(mrope, src)
    assert out.shape == (3, 2, 3) and out[2].tolist() == [[210, 212, 213], [201, 203, 203]]


def test_tower_passes_per_prompt(small_models, photos):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model, proc = small_models["llava_next"]
    batch = proc(images=photos, text=["<image> a", "b <image>", "<image> c"], return_tensors="pt", padding=True)
    grids = adapter_for(model).tower_grids(batch)
    cfg = model.config
    want = [image_size_to_num_patches(s.tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            for s in batch["image_sizes"]]
    assert [len(g) for g in grids] == want and grids[0][0] == (12, 12)
    model, proc = small_models["llava"]
    batch = proc(images=photos[:2], text=["<image> a", "b <image>"], return_tensors="pt", padding=True)
    assert adapter_for(model).tower_grids(batch) == [[(12, 12)], [(12, 12)]]


def test_an_unknown_position_mode_is_refused_by_the_family(models):
    import vtc

    with pytest.raises(ConfigError, match="position_ids"):
        vtc.apply(models["llava"], "pool:keep=16", position_ids="packed")


def test_in_llm_operators_are_refused_where_the_family_does_not_run_them(models, monkeypatch):
    import vtc
    from vtc.integrations.adapters.llava import LlavaAdapter

    monkeypatch.setattr(LlavaAdapter, "supports_llm_layer", False)  # a family without the in-LLM stage
    with pytest.raises(ConfigError, match="fastv runs inside the language model"):
        vtc.apply(models["llava"], "divprune:keep=64 | fastv")
    assert "forward" not in models["llava"].__dict__


@torch.no_grad()
def test_negative_and_named_layers_resolve_against_the_tower(small_models, photos):
    """vtc-cls with layers [-2, 'feature'] on LLaVA (4-layer tower, vision_feature_layer=-2) reads layer 2."""
    import vtc

    model, proc = small_models["llava"]
    batch = proc(images=photos[:1], text=["<image> a"], return_tensors="pt")
    picks = []
    for layers in ("[2]", "[-2]", "['feature']"):
        with vtc.apply(model, f"vtc-cls:keep=16,layers={layers}") as h:
            model(**batch)
        picks.append(h.last.index[0])
    assert torch.equal(picks[0], picks[1]) and torch.equal(picks[0], picks[2])
