"""vtc.taps.layers: negative and symbolic layers resolve once against the real tower, in taps and in VisualTokens.signal."""

import pytest
import torch

pytest.importorskip("transformers")
from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

import vtc  # noqa: E402
from vtc.errors import ConfigError, SignalError, TapError  # noqa: E402
from vtc.taps import LayerSpace, attach, hidden_state_layer, sorted_layers, to_tokens  # noqa: E402


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                           image_size=32, patch_size=8)
    return CLIPVisionModel(cfg).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------- LayerSpace
def test_every_form_resolves_to_a_layer_number():
    space = LayerSpace(24, feature_layer=-2)
    assert space.feature_layer == 22
    assert [space.resolve(l) for l in (0, 23, -1, -24, "last", "feature")] == [0, 23, 23, 0, 23, 22]
    assert space.resolve_all([22, -2, "feature", 3]) == [3, 22]


@pytest.mark.parametrize("layer", [24, -25, 100])
def test_out_of_range_names_the_depth(layer):
    with pytest.raises(TapError, match=r"this tower has 24 layers, valid layers are 0\.\.23"):
        LayerSpace(24).resolve(layer)


@pytest.mark.parametrize("layer", ["features", "2", 1.0, True, None])
def test_non_layers_are_refused(layer):
    with pytest.raises(TapError, match="integers or one of 'feature', 'last'"):
        LayerSpace(24).resolve(layer)


def test_unknown_feature_layer_raises_instead_of_guessing():
    with pytest.raises(TapError, match="feature layer is not known.*feature_layer=-2"):
        LayerSpace(24).resolve("feature")
    with pytest.raises(TapError, match="does not exist in a 24-layer tower"):
        LayerSpace(24, feature_layer=24)
    with pytest.raises(SignalError):  # the caller picks the error class
        LayerSpace(24).resolve(30, error=SignalError)


def test_hidden_state_indices_convert_to_layers():
    assert hidden_state_layer(-2, 24) == 22  # LLaVA-1.5's vision_feature_layer
    assert hidden_state_layer(-1, 24) == 23 and hidden_state_layer(1, 24) == 0 and hidden_state_layer(24, 24) == 23
    with pytest.raises(TapError, match="embeddings"):
        hidden_state_layer(0, 24)
    with pytest.raises(TapError, match="25 hidden states"):
        hidden_state_layer(25, 24)


def test_sorted_layers_orders_mixed_forms():
    assert sorted_layers({"last", 3, -2, "feature", 0}) == [0, 3, -2, "feature", "last"]


# ---------------------------------------------------------------------- taps
def test_tap_resolves_requires_once_with_the_feature_layer(clip):
    with attach(clip, {"cls_attn": ["feature", -1, 2], "keys": ["last"]}, feature_layer=-2) as tap:
        assert tap.requires == {"cls_attn": [2, 3], "keys": [3]}
        assert tap.layer_space == LayerSpace(4, 2) and tap.resolve("feature") == 2
    with pytest.raises(TapError, match="feature layer is not known"):
        attach(clip, {"cls_attn": ["feature"]})  # a bare CLIP tower does not know which layer a VLM reads
    with pytest.raises(TapError, match="does not exist in a 4-layer tower"):
        attach(clip, {"cls_attn": [0]}, feature_layer=22)  # CLIP-L's number on a 4-layer tower


def test_tap_signal_and_per_image_take_any_form(clip, pixels):
    with attach(clip, {"cls_attn": ["feature"]}, feature_layer=2) as tap, torch.no_grad():
        clip(pixels)
    assert tap.signal("cls_attn", -2) is tap.signals["cls_attn"][2] is tap.signal("cls_attn", "feature")
    rows = tap.per_image("cls_attn", 2)
    assert len(rows) == 2 and torch.equal(rows[1], tap.signals["cls_attn"][2][1])
    with pytest.raises(TapError, match="holds no 'cls_attn' at layer 'last'"):
        tap.signal("cls_attn", "last")


# ---------------------------------------------------------------------- VisualTokens.signal
def _tokens(clip, pixels, requires, **kw):
    with attach(clip, requires, **kw) as tap, torch.no_grad():
        out = clip(pixels, output_hidden_states=True)
    return to_tokens(out.hidden_states[-2], tap)


def test_visual_tokens_resolve_layers_with_the_taps_layer_space(clip, pixels):
    tokens = _tokens(clip, pixels, {"cls_attn": [2, 3]}, feature_layer=-2)
    assert tokens.layer_space == LayerSpace(4, 2)
    s = tokens.signals["cls_attn"]
    assert tokens.signal("cls_attn", "feature") is s[2] and tokens.signal("cls_attn", -2) is s[2]
    assert tokens.signal("cls_attn", "last") is s[3] and tokens.signal("cls_attn", 3) is s[3]
    with pytest.raises(SignalError, match=r"'cls_attn' at vision layer -4 \(= layer 0\) but it was not recorded"):
        tokens.signal("cls_attn", -4)
    with pytest.raises(SignalError, match="this tower has 4 layers"):
        tokens.signal("cls_attn", 22)


def test_visual_tokens_without_a_layer_space_refuse_relative_layers(clip, pixels):
    tokens = vtc.VisualTokens(x=torch.randn(1, 4, 8), signals={"cls_attn": {22: torch.rand(1, 4), -1: torch.rand(1, 4)}})
    assert tokens.layer_space is None and tokens.signal("cls_attn", 22) is tokens.signals["cls_attn"][22]
    assert tokens.signal("cls_attn", -1) is tokens.signals["cls_attn"][-1]  # recorded under -1 by hand: found as is
    for layer in ("feature", -2):
        with pytest.raises(SignalError, match="carry no layer_space"):
            tokens.signal("cls_attn", layer)


def test_layer_space_survives_keep_merge_and_regrouping():
    space = LayerSpace(4, 2)
    t = vtc.VisualTokens(x=torch.randn(2, 6, 8), signals={"keys": {2: torch.randn(2, 6, 8)}}, layer_space=space)
    assert t.keep_mask(torch.rand(2, 6) > 0.3).layer_space is space
    assert t.gather(torch.tensor([[0, 1], [2, 3]])).layer_space is space
    merged = t.merge(torch.tensor([[0, 0, 1, 1, 2, 2]] * 2), torch.tensor([[0, 2, 4]] * 2))
    assert merged.layer_space is space and merged.signal("keys", "feature").shape == (2, 3, 8)
    rows, G = t.split_groups()
    assert rows.layer_space is space and t.join_groups(rows, G).layer_space is space
    assert vtc.build("tome:keep=3,metric=keys,layer=feature")(t).layer_space is space
    ragged = t.replace(mask=torch.arange(6).expand(2, 6) < torch.tensor([[2], [6]]))  # image 0 already fits keep=3
    assert vtc.build("tome:keep=3,metric=keys,layer=feature")(ragged).layer_space is space


# ---------------------------------------------------------------------- operators
def test_operator_configs_accept_every_layer_form():
    assert vtc.create("vtc-cls", keep=4, layers="[-2, feature, 1, last]").requires == {
        "cls_attn": [1, -2, "feature", "last"]}
    assert vtc.create("hired", top_layer="0", bottom_layer="feature").requires == {"cls_attn": [0, "feature"]}
    assert vtc.create("globalcom2", layer="last").requires == {"cls_logits": ["last"]}
    assert vtc.create("tome", keep=3, metric="keys", layer=-1).requires == {"keys": [-1]}
    pipe = vtc.build("vtc-cls:keep=4,layers=[1,feature] | tome:keep=2,metric=keys,layer=-1")
    assert pipe.requires == {"cls_attn": [1, "feature"], "keys": [-1]}
    for bad in ("vtc-cls:keep=4,layers=[features]", "globalcom2:layer=first", "hired:top_layer=1.5"):
        with pytest.raises(ConfigError):
            vtc.build(bad)


def test_symbolic_layers_select_what_their_numbers_select(clip, pixels):
    named = vtc.build("vtc-cls:keep=5,layers=[feature, -1]")
    numbered = vtc.build("vtc-cls:keep=5,layers=[2, 3]")
    with attach(clip, named.requires, feature_layer=-2) as tap, torch.no_grad():  # LLaVA-style: layer 22 of 24
        out = clip(pixels, output_hidden_states=True)
    assert tap.requires == numbered.requires == {"cls_attn": [2, 3]}
    tokens = to_tokens(out.hidden_states[-2], tap)
    a, b = named(tokens), numbered(tokens)
    assert torch.equal(a.index, b.index) and torch.equal(a.x, b.x)
    assert not torch.equal(a.index, vtc.build("vtc-cls:keep=5,layers=[last]")(tokens).index)  # the layers matter
