"""Tower-relative layers through vtc.apply: negative numbers, names and the operators' defaults resolve
against the model's tower (the small models' 4-layer CLIP, features from layer 2 = hidden_states[-2])."""

from __future__ import annotations

import pytest
import torch

import vtc

#: (relative form, the same layers by number on the 4-layer tower)
PAIRS = [
    ("aim_merge:keep=16,layer=-1", "aim_merge:keep=16,layer=3"),
    ("tome:keep=16,metric=keys,layer=-1", "tome:keep=16,metric=keys,layer=3"),
    ("tome:keep=16,metric=keys", "tome:keep=16,metric=keys,layer=2"),
    ("vtc-cls:keep=16", "vtc-cls:keep=16,layers=[0,1,2]"),
    ("hiprune:keep=16", "hiprune:keep=16,object_layer=1,deep_layer=2"),
    ("visionzip:keep=16,compat=clean", "visionzip:keep=16,compat=clean,layer=2"),
    ("hired:keep=16", "hired:keep=16,top_layer=0,bottom_layer=2"),
]


@pytest.mark.parametrize("relative, numbered", PAIRS)
@torch.no_grad()
def test_relative_layers_select_what_their_numbers_select(small_models, photos, relative, numbered):
    model, proc = small_models["llava"]
    inputs = proc(images=photos[:2], text=["<image> what is this ?"] * 2, return_tensors="pt", padding=True)
    kept = []
    for spec in (relative, numbered):
        with vtc.apply(model, spec) as h:
            model(**inputs)
        kept.append(h.last.index)
    assert [len(i) for i in kept[0]] == [16, 16]
    assert all(torch.equal(a, b) for a, b in zip(*kept))
