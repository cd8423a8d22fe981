"""End to end, for every registered operator: processor -> model -> vtc.apply -> generate on a real photo.

The operator list comes from ``vtc.list_ops()``, so operators added later are covered; ``SKIP``
names the ones that do not fit a model, with the reason. Models have the random models' 4-layer
tower (features from layer 2), so every operator runs with its tower-relative default layers
(vtc-cls 0..2, hired 0 and 2, globalcom2 and aim_merge 3, visionzip 2 with the CLS token,
hiprune 1 and 2), and a 12x12 patch grid (8-px patches) to stay cheap; operators that take a
budget get ``keep=36`` (a 6x6 grid for the pooling ones).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import vtc
from vtc.registry import get_op

#: (operator, model kind or "*") -> why it is not run end to end
SKIP: dict[tuple[str, str], str] = {
    ("mqt", "llava_next"): "MQT-LLaVA is a LLaVA-1.5 method (one partition); see test_mqt_refuses_anyres_crops",
}
#: operator arguments used here besides the budget: name -> kwargs
ARGS: dict[str, dict] = {
    # in-LLM operators on the models' 2-layer decoders
    "fastv": {"K": 1},
    "pdrop": {"layers": [0, 1], "ratios": [0.5, 0.25]},
    "aim": {"start": 0, "step": 0.5},
    "sparsevlm": {"layers": [0, 1], "counts": [20, 10]},
    "router": {"dim": 64, "layers": [0]},
}

BUDGET = 36


@pytest.fixture(scope="module")
def models():
    from vtc.models.random import random_llava, random_llava_next

    spec = dict(patch_size=8)
    return {"llava": random_llava(**spec), "llava_next": random_llava_next(**spec)}


def _operator(name: str, model):
    """The operator with its defaults, and a 36-token budget where it takes one (MQT: a fresh
    projector shaped for this random model, as the embedded trained one has other widths)."""
    if name == "mqt":
        cfg = model.config
        return vtc.create("mqt", keep=BUDGET, weights="none", dim=cfg.vision_config.hidden_size,
                          out_dim=cfg.text_config.hidden_size, heads=4, queries=64)
    cls = get_op(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    args = {}
    if "keep" in fields:
        args["keep"] = BUDGET
    return vtc.create(name, **args, **ARGS.get(name, {}))


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
@pytest.mark.parametrize("name", vtc.list_ops())
@torch.no_grad()
def test_every_operator_generates_from_a_real_photo(models, photos, name, kind):
    for key in ((name, kind), (name, "*")):
        if key in SKIP:
            pytest.skip(SKIP[key])
    model, proc = models[kind]
    op = _operator(name, model)  # operators that read signals get them from a vtc.taps tap on the tower
    inputs = proc(images=[photos[0]], text=["user : <image> what is in this photo ? assistant :"], return_tensors="pt")
    L = inputs["input_ids"].shape[1]
    with vtc.apply(model, op) as h:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, :L], inputs["input_ids"])
    assert L < out.shape[1] <= L + 3
    if op.stage == "llm_layer":  # the LLM gets every token and drops some after its first layer
        assert h.last.counts == h.last.stock_counts and 0 < h.last.extra["layer_visual"][0][-1] < h.last.counts[0]
    else:
        assert 0 < h.last.counts[0] < h.last.stock_counts[0]
    sent = h.last.tokens.x[0, : h.last.counts[0]]
    assert torch.isfinite(sent).all()
    assert "forward" not in model.__dict__


@torch.no_grad()
def test_mqt_refuses_anyres_crops(models, photos):
    model, proc = models["llava_next"]
    inputs = proc(images=[photos[0]], text=["user : <image> what is in this photo ? assistant :"], return_tensors="pt")
    with vtc.apply(model, _operator("mqt", model)), pytest.raises(vtc.errors.LayoutError, match="one partition"):
        model.generate(**inputs, max_new_tokens=1)
