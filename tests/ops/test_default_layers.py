"""Operators' default tower layers are tower-relative: LLaVA-1.5's official numbers on CLIP-L, sensible elsewhere.

Each default resolves (vtc.taps.LayerSpace) to exactly the layer numbers the official code reads on
CLIP-L (24 layers, features from layer 22), and to layers that exist on the embedded 4-layer towers
(features from layer 2) and on a 32-layer tower whose features are its last layer (Qwen VL).
"""

import pytest

import vtc
from vtc.taps import LayerSpace

#: operator (with the arguments that select its layer reads) -> the official CLIP-L requires
CLIP_L_OFFICIAL = {
    ("vtc-cls", ()): {"cls_attn": list(range(16, 23))},
    ("hired", ()): {"cls_attn": [0, 22]},
    ("globalcom2", ()): {"cls_logits": [23]},
    ("visionzip", ()): {"cls_attn": [22], "keys": [22]},
    ("visionzip", (("signal", "attn_received"),)): {"attn_received": [22], "keys": [22]},
    ("hiprune", ()): {"attn_received": [8, 22]},
    ("aim_merge", ()): {"keys": [23]},
    ("tome", (("metric", "keys"),)): {"keys": [22]},
}

#: the same operators on a 4-layer tower with feature layer 2 (the embedded tiny models)
TINY = {
    ("vtc-cls", ()): {"cls_attn": [0, 1, 2]},
    ("hired", ()): {"cls_attn": [0, 2]},
    ("globalcom2", ()): {"cls_logits": [3]},
    ("visionzip", ()): {"cls_attn": [2], "keys": [2]},
    ("visionzip", (("signal", "attn_received"),)): {"attn_received": [2], "keys": [2]},
    ("hiprune", ()): {"attn_received": [1, 2]},
    ("aim_merge", ()): {"keys": [3]},
    ("tome", (("metric", "keys"),)): {"keys": [2]},
}

#: a 32-layer tower read at its last layer (Qwen2.5-VL's ViT)
QWEN = {
    ("visionzip", (("signal", "attn_received"),)): {"attn_received": [31], "keys": [31]},
    ("hiprune", ()): {"attn_received": [10, 31]},
    ("tome", (("metric", "keys"),)): {"keys": [31]},
}


def _resolved(key, space):
    name, args = key
    op = vtc.create(name, **dict(args))
    return {sig: space.resolve_all(layers) for sig, layers in op.requires.items()}


@pytest.mark.parametrize("key", list(CLIP_L_OFFICIAL), ids=lambda k: k[0] + "".join(f",{a}={v}" for a, v in k[1]))
def test_defaults_are_the_official_layers_on_clip_l_and_exist_on_small_towers(key):
    assert _resolved(key, LayerSpace(24, feature_layer=22)) == CLIP_L_OFFICIAL[key]
    assert _resolved(key, LayerSpace(4, feature_layer=2)) == TINY[key]
    if key in QWEN:
        assert _resolved(key, LayerSpace(32, feature_layer=31)) == QWEN[key]


def test_every_operator_with_tower_layers_is_listed():
    """A new operator that reads tower signals adds its official CLIP-L layers here."""
    listed = {name for name, _ in CLIP_L_OFFICIAL}
    for name in vtc.list_ops():
        cls = vtc.registry.get_op(name)
        if cls.default_stage == "llm_layer" or name == "mqt":
            continue
        op = vtc.create(name, **({"metric": "keys"} if name == "tome" else {}))
        if op.requires:
            assert name in listed, name
