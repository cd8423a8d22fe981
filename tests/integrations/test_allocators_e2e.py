"""HiRED and GlobalCom² end to end: tiny random LLaVA-NeXT, a real photo, ``vtc.apply`` -> ``generate``.

The allocator in the pipeline is spied on (its ``forward``, or ``allocate`` when a selector fills its
budgets) to see the tokens it decided on; the test then checks that the language model receives
exactly those patch tokens (in order when the allocator selects itself, per-partition counts equal
to the budgets when a selector fills them) plus the newline tokens of the operator's policy, and
that the prompt the LM reads is shortened by the difference to stock LLaVA-NeXT.
"""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.ops.anyres import unpad_bounds

# vtc.apply (branch hf) and vtc.taps (branch taps): this file runs once both are on main
pytest.importorskip("vtc.integrations", reason="vtc.integrations (vtc.apply) has not landed on this branch")
pytest.importorskip("vtc.taps", reason="vtc.taps has not landed on this branch")

PROMPT = "user : <image> what is in this photo ? assistant :"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one intra-op thread on the shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def next_model():
    """24 vision layers so the default signal layers (0, 22, 23) exist; a 12x12 patch grid to stay cheap."""
    from vtc.models.random import random_llava_next

    return random_llava_next(vision_layers=24, patch_size=8)


@pytest.fixture(scope="module")
def photo():
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[0])  # 427 x 640: a 2-crop-row grid, rows unpadded


def _spy(pipe):
    """Record (input, output) of the pipeline's first operator: its allocate() when it hands off."""
    op = pipe[0]
    method = "allocate" if pipe.hands_off(0) else "forward"
    inner = getattr(op, method)
    seen = []

    def record(tokens):
        out = inner(tokens)
        seen.append((tokens, out))
        return out

    setattr(op, method, record)
    return seen


def _expected_newlines(policy, layout, patch_index):
    (h, w), (nh, nw) = layout.grids[0], layout.anyres
    if policy == "none":
        return 0
    if policy == "all_rows":
        return nh * h
    r0, r1, c0, c1 = unpad_bounds((nh * h, nw * w), layout.image_size)
    rows = set()
    for i in patch_index.tolist():
        p, t = divmod(i, h * w)
        if p:
            rows.add(((p - 1) // nw) * h + t // w)
    assert all(r0 <= r < r1 for r in rows)
    return len(rows)


def _assembly_rank(i: int, layout) -> tuple[int, int, int]:
    """Where patch ``i`` (partition-major tower index) sits in LLaVA-NeXT's assembled sequence:
    the base view first, then the crop grid row-major across crops."""
    (h, w), (_, nw) = layout.grids[0], layout.anyres
    p, t = divmod(i, h * w)
    if p == 0:
        return (0, t, 0)
    r, c = divmod(p - 1, nw)
    return (1, r * h + t // w, c * w + t % w)


@pytest.mark.parametrize("spec", [
    "hired:ratio=0.2", "hired:ratio=0.2,compat=clean", "hired:ratio=0.2 | divprune",
    "hired:ratio=0.2,compat=clean | divprune", "globalcom2", "globalcom2:compat=clean", "globalcom2 | random",
    "globalcom2 | divprune",
])
@torch.no_grad()
def test_allocators_budget_what_the_language_model_receives(next_model, photo, spec):
    model, proc = next_model
    inputs = proc(images=[photo], text=[PROMPT], return_tensors="pt")
    L = inputs["input_ids"].shape[1]
    pipe = vtc.build(spec)
    seen = _spy(pipe)
    lm_lengths = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: lm_lengths.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        with vtc.apply(model, pipe) as h:
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert torch.equal(out[:, :L], inputs["input_ids"]) and L < out.shape[1] <= L + 3
    t_in, t_out = seen[0]
    layout = t_in.layouts()[0]
    assert layout.anyres is not None
    if pipe[0].sees_padding:  # official HiRED ranks padding too: complete partitions
        assert int(t_in.counts[0]) == layout.num_tokens
    else:  # the integration drops the crops' padding first: base view + each crop's unpadded area
        (gh, gw), (nh, nw) = layout.grids[0], layout.anyres
        r0, r1, c0, c1 = unpad_bounds((nh * gh, nw * gw), layout.image_size)
        assert int(t_in.counts[0]) == gh * gw + (r1 - r0) * (c1 - c0)
    last = h.last
    idx = last.index[0]
    patches = idx[idx < last.num_patches[0]]
    n_newlines = int((idx >= last.num_patches[0]).sum())
    P, N = layout.num_partitions, layout.grids[0][0] * layout.grids[0][1]
    if pipe.hands_off(0):
        per_part = torch.bincount(patches // N, minlength=P)
        assert per_part.tolist() == t_out.budget[0].tolist()
    else:
        assert patches.tolist() == t_out.index[0, : t_out.counts[0]].tolist()
    crops = [i for i in patches.tolist() if i >= N]  # row-major over the crop grid, as stock assembles them
    assert crops == sorted(crops, key=lambda i: _assembly_rank(i, layout))
    assert n_newlines == _expected_newlines(pipe[0].newline_policy, layout, patches)
    assert last.counts[0] == patches.numel() + n_newlines < last.stock_counts[0]
    assert lm_lengths[0] == L - last.stock_counts[0] + last.counts[0]
    if spec == "hired:ratio=0.2":  # official budget: B_tot = int(P*N*0.2), the thumbnail int(B_tot/2)
        b_tot = int(P * N * 0.2)
        assert int((patches < N).sum()) == min(b_tot // 2, N) and patches.numel() <= b_tot


@torch.no_grad()
def test_hired_on_llava15_keeps_int_576_rate(photo):
    """The single-partition variant on LLaVA-1.5 (24x24 grid): int(576*0.2) = 115 tokens, raster order."""
    from vtc.models.random import random_llava

    model, proc = random_llava(vision_layers=24)
    inputs = proc(images=[photo], text=[PROMPT], return_tensors="pt")
    with vtc.apply(model, "hired:ratio=0.2") as h:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    idx = h.last.index[0]
    assert h.last.counts[0] == 115 and h.last.stock_counts[0] == 576
    assert torch.equal(idx, idx.sort().values)
