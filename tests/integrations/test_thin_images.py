"""LLaVA-NeXT images so thin that the unpad leaves no crop row or no crop column (a 400x4 photo).

Stock LLaVA-NeXT sends the base view and, when columns are gone, a newline per crop-grid row; vtc
does the same: the integration's assembly emits those newlines, and HiRED / GlobalCom², which
budget crops by their unpadded area, keep only thumbnail tokens for such an image instead of
failing the whole batch.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vtc

PROMPTS = ["user : <image> what is this ?", "<image> describe", "what color is the <image> ?"]


@pytest.fixture(scope="module")
def next_model():
    from vtc.models.random import random_llava_next

    return random_llava_next(vision_layers=24, patch_size=8)  # default signal layers exist; 12x12 grids


@pytest.fixture(scope="module")
def images(photos):
    # PIL sizes (width, height): 400x4 leaves no crop row, 4x400 no crop column (a newline per row)
    return [photos[0], Image.new("RGB", (400, 4), (200, 40, 90)), Image.new("RGB", (4, 400), (20, 140, 60))]


@torch.no_grad()
def test_keeping_everything_equals_stock(next_model, images):
    model, proc = next_model
    for image in images[1:]:
        one = proc(images=[image], text=PROMPTS[:1], return_tensors="pt")
        stock = model(**one).logits
        with vtc.apply(model, "identity") as h:
            got = model(**one).logits
        assert h.last.counts == h.last.stock_counts
        torch.testing.assert_close(got, stock)


@pytest.mark.parametrize("spec", ["hired", "hired:compat=clean", "globalcom2", "globalcom2:compat=clean",
                                  "hired | divprune", "globalcom2 | divprune"])
@torch.no_grad()
def test_a_thin_image_in_a_batch_runs_and_equals_it_alone(next_model, images, spec):
    model, proc = next_model
    batch = proc(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    alone = [proc(images=[im], text=[t], return_tensors="pt") for im, t in zip(images, PROMPTS)]
    with vtc.apply(model, spec) as h:
        out = model(**batch)
        counts, index, patches = h.last.counts, h.last.index, h.last.num_patches
        singles = []
        for one in alone:
            o = model(**one)
            singles.append((o.logits[0, -1], h.last.counts[0], h.last.index[0]))
    for b, (logit, count, idx) in enumerate(singles):
        assert counts[b] == count and torch.equal(index[b], idx)
        torch.testing.assert_close(out.logits[b, -1], logit, rtol=1e-4, atol=1e-5)
    N = 12 * 12
    for b in (1, 2):  # the thin images send thumbnail tokens and newlines only
        kept = index[b][index[b] < patches[b]]
        assert kept.numel() > 0 and bool((kept < N).all())
    assert bool((index[0][index[0] < patches[0]] >= N).any())  # the photo keeps crop tokens
