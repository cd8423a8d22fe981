"""The official crop geometry of HiRED and GlobalCom² reaches the language model through vtc.apply,
and ``unpad_rounding=`` sets the unpad of the whole pipeline.

HiRED's fork tiles the ``nH x nW`` crops on an ``nW x nH`` grid and unpads it in float32;
GlobalCom²'s code places each kept crop token at the cell numbered by its rank among its crop's
unpadded cells and puts a newline after every grid row. The sequence the language model receives
(``handle.last.index``) is checked against a reference built with loops (``tests/_geometry_ref.py``)
from the tokens the operator kept.
"""

from __future__ import annotations

import pytest
import torch
from _geometry_ref import ref_cells  # tests/ is on sys.path (its conftest)
from PIL import Image

import vtc
from vtc.errors import ConfigError

PROMPT = "user : <image> what is in this photo ? assistant :"
SIDE = 12  # 96-px crops of 8-px patches


@pytest.fixture(scope="module")
def next_model():
    from vtc.models.random import random_llava_next

    return random_llava_next(vision_layers=24, patch_size=8)


def _image(w, h):
    g = torch.Generator().manual_seed(w * 1000 + h)
    return Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _spy(op):
    seen = []
    inner = op.forward

    def record(tokens):
        out = inner(tokens)
        seen.append(out)
        return out

    op.forward = record
    return seen


# PIL (width, height): 1x2 crops with rows unpadded (the fork's transposed grid loses most of them),
# 2x1 crops, and 1x2 crops with columns unpadded (rank placement reflows the rows of both crops)
IMAGES = [(192, 80), (80, 192), (150, 100)]


@pytest.mark.parametrize("size", IMAGES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("spec, rounding, transposed, rank, newlines", [
    ("hired", "float32", True, False, False), ("globalcom2", "float64", False, True, True)])
@torch.no_grad()
def test_the_language_model_receives_the_official_crop_layout(next_model, size, spec, rounding, transposed, rank,
                                                              newlines):
    model, proc = next_model
    inputs = proc(images=[_image(*size)], text=[PROMPT], return_tensors="pt")
    pipe = vtc.build(spec)
    seen = _spy(pipe[0])
    with vtc.apply(model, pipe) as h:
        model(**inputs)
    layout = h.last.tokens.layouts()[0]
    nh, nw = layout.anyres
    N = SIDE * SIDE
    kept = seen[0].index[0, : int(seen[0].counts[0])].tolist()
    cells = ref_cells(nh, nw, SIDE, layout.image_size, rounding, transposed, rank)
    tw = nh if transposed else nw
    W = tw * SIDE
    # the base view as the operator emitted it, then crop tokens and newlines in grid order
    seq = [i for i in kept if i < N]
    crop = [(cells[i][1][0] * (W + 1) + cells[i][1][1], i) for i in kept if i >= N and cells[i][0]]
    if newlines:
        crop += [(r * (W + 1) + W, layout.num_tokens + r) for r in range(nh * nw // tw * SIDE)]
    seq += [i for _, i in sorted(crop)]
    assert h.last.index[0].tolist() == seq
    assert all(cells[i][0] for i in kept if i >= N)  # the operator spends nothing on padding it unpads


@torch.no_grad()
def test_hired_official_transposed_grid_keeps_fewer_tokens_on_non_square_grids(next_model):
    """The fork's bug on a 1x2 image whose true grid has no padding (as 336x672 on LLaVA-NeXT-7B):
    the transposed 24x12 grid keeps 6 of its 24 rows, so most crop picks are cut."""
    model, proc = next_model
    inputs = proc(images=[_image(192, 96)], text=[PROMPT], return_tensors="pt")
    patches = {}
    for compat in ("official", "clean"):
        with vtc.apply(model, f"hired:compat={compat}") as h:
            model(**inputs)
        idx = h.last.index[0]
        patches[compat] = idx[idx < h.last.num_patches[0]]
    N = SIDE * SIDE
    b_tot = int(3 * N * 0.2)  # 86: the thumbnail takes 43, the crops share 43
    assert patches["clean"].numel() == b_tot
    crop = patches["official"][patches["official"] >= N]
    assert int((patches["official"] < N).sum()) == b_tot // 2 and 0 < crop.numel() < b_tot - b_tot // 2
    rows = {((i - N) // N, (i % N) // SIDE) for i in crop.tolist()}  # (crop, row): crop 0 rows 9..11, crop 1 rows 0..2
    assert rows <= {(0, 9), (0, 10), (0, 11), (1, 0), (1, 1), (1, 2)}


@torch.no_grad()
def test_unpad_rounding_sets_the_unpad_of_the_pipeline(next_model):
    """88x110 on 1x2 crops: transformers keeps columns 4..19 of the 12x24 grid, original LLaVA's
    float64 columns 5..18 (its product lands just below 14)."""
    model, proc = next_model
    inputs = proc(images=[_image(110, 88)], text=[PROMPT], return_tensors="pt")
    out = {}
    for rounding in ("transformers", "float64"):
        with vtc.apply(model, "identity", unpad_rounding=rounding) as h:
            model(**inputs)
        out[rounding] = h.last
    assert out["transformers"].counts == out["transformers"].stock_counts
    lost = set(out["transformers"].index[0].tolist()) - set(out["float64"].index[0].tolist())
    cols = {((i - SIDE * SIDE) // (SIDE * SIDE), (i % (SIDE * SIDE)) % SIDE) for i in lost}
    assert cols == {(0, 4), (1, 7)}  # grid columns 4 and 19: the left crop's 5th, the right crop's 8th
    assert out["float64"].counts[0] == out["transformers"].counts[0] - 2 * SIDE


def test_a_rounding_that_contradicts_an_operator_is_refused(next_model):
    model, _ = next_model
    with pytest.raises(ConfigError, match="hired:unpad_rounding=transformers"):
        vtc.apply(model, "hired", unpad_rounding="transformers")
    vtc.apply(model, "hired:unpad_rounding=transformers", unpad_rounding="transformers").remove()
    vtc.apply(model, "hired:compat=clean", unpad_rounding="transformers").remove()
    assert "forward" not in model.__dict__
