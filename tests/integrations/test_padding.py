"""LLaVA-NeXT padding tokens: dropped before the first operator unless it declares ``sees_padding``."""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.geometry import unpad_bounds

PROMPT = "user : <image> what is in this photo ? assistant :"


@pytest.fixture(scope="module")
def next_model():
    from vtc.models.random import random_llava_next

    return random_llava_next(patch_size=8)  # 12x12 grid per partition


@pytest.fixture(scope="module")
def inputs(next_model):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[0])  # 427 x 640: the crop grid loses rows to unpadding
    return next_model[1](images=[photo], text=[PROMPT], return_tensors="pt")


def _patches(h):
    idx = h.last.index[0]
    return idx[idx < h.last.num_patches[0]]


def _padding_cells(layout):
    (gh, gw), (nh, nw) = layout.grids[0], layout.anyres
    r0, r1, c0, c1 = unpad_bounds((nh * gh, nw * gw), layout.image_size)
    out = set()
    for p in range(1, 1 + nh * nw):
        for t in range(gh * gw):
            R, C = ((p - 1) // nw) * gh + t // gw, ((p - 1) % nw) * gw + t % gw
            if not (r0 <= R < r1 and c0 <= C < c1):
                out.add(p * gh * gw + t)
    return out


@torch.no_grad()
@pytest.mark.parametrize("spec", ["random:keep=64", "divprune:keep=64,stage=vision", "tome:keep=64"])
def test_first_operator_never_spends_budget_on_padding(next_model, inputs, spec):
    model, _ = next_model
    with vtc.apply(model, spec) as h:
        model(**inputs)
    patches = _patches(h)
    assert patches.numel() == 64  # the whole budget reaches the language model
    layout = h.last.tokens.layouts()[0]
    assert not set(patches.tolist()) & _padding_cells(layout)


@torch.no_grad()
def test_padding_keep_lets_the_first_operator_see_padding(next_model, inputs):
    model, _ = next_model
    layout = None
    for seed in range(5):  # with padding candidates, some seed's random picks land in padding
        with vtc.apply(model, f"random:keep=200,seed={seed}", padding="keep") as h:
            model(**inputs)
        layout = h.last.tokens.layouts()[0]
        if _patches(h).numel() < 200:
            break
    else:
        pytest.fail("random picks never fell in the padding although 1/3 of the crop cells are padding")
    assert _padding_cells(layout)


def test_who_sees_padding():
    assert vtc.create("m3", keep=36).sees_padding and vtc.create("pool", keep=36).sees_padding
    assert vtc.create("hired", ratio=0.2).sees_padding  # official
    assert not vtc.create("hired", ratio=0.2, compat="clean").sees_padding
    assert not any(vtc.create(n, keep=8).sees_padding for n in ("divprune", "random", "uniform", "tome", "vtc-cls"))
    with pytest.raises(vtc.errors.ConfigError, match="padding"):
        from vtc.integrations.options import ApplyOptions

        ApplyOptions(padding="sometimes")
