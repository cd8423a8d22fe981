"""vtc.integrations.anyres: LLaVA-NeXT unpadding, stock token counts, and the assembly of kept tokens."""

from __future__ import annotations

import pytest
import torch

from vtc.errors import ConfigError
from vtc.geometry import Layout, stock_length, unpad_bounds
from vtc.integrations import anyres
from vtc.tokens import VisualTokens

SIZES = [(427, 640), (427, 200), (150, 640), (96, 96), (500, 333), (333, 500), (1000, 10), (10, 1000), (97, 193)]


@pytest.mark.parametrize("grid", [(48, 48), (24, 72), (72, 24), (48, 24), (12, 12)])
def test_unpad_bounds_match_transformers_unpad_image(grid):
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    H, W = grid
    cells = torch.arange(H * W).view(1, H, W)
    for size in SIZES:
        kept = unpad_image(cells, torch.tensor(size))[0]
        r0, r1, c0, c1 = unpad_bounds((H, W), size)
        assert torch.equal(kept, cells[0, r0:r1, c0:c1]), size


def test_stock_length_matches_the_processor(llava_next, photos):
    from PIL import Image

    model, proc = llava_next
    images = [photos[0], photos[1], photos[2], Image.new("RGB", (50, 300)), Image.new("RGB", (301, 77))]
    batch = proc(images=images, text=["<image>"] * len(images), return_tensors="pt", padding=True)
    counts = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    cfg = model.config
    for size, count in zip(batch["image_sizes"].tolist(), counts):
        crops = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        assert stock_length(Layout.for_anyres((24, 24), crops, size)) == count


def _partitions(sizes, grid=(3, 4), crops_of=None, D=5, seed=0):
    """Random per-partition features [T, h*w, D] and layouts for images of ``sizes``."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    layouts = [Layout.for_anyres(grid, crops_of(s), s) for s in sizes]
    parts = [lay.num_partitions for lay in layouts]
    flat = VisualTokens(x=torch.randn(sum(parts), h * w, D, generator=g))
    return flat, parts, layouts


def _crops(size):
    return {(427, 640): (2, 2), (427, 200): (2, 1), (150, 640): (1, 3), (96, 96): (1, 1)}.get(tuple(size), (2, 2))


def test_keep_everything_assembles_exactly_like_stock_pack_image_features(llava_next):
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    model, _ = llava_next
    cfg = model.config
    sizes = [(427, 640), (427, 200), (150, 640)]
    g = torch.Generator().manual_seed(1)
    layouts = [Layout.for_anyres((24, 24), get_anyres_image_grid_shape(s, cfg.image_grid_pinpoints, 96), s)
               for s in sizes]
    parts = [lay.num_partitions for lay in layouts]
    feats = torch.randn(sum(parts), 576, 8, generator=g)
    newline = torch.randn(8, generator=g)
    stock, lens = model.model.pack_image_features(torch.split(feats, parts), torch.tensor(sizes), "default", newline)
    tokens = anyres.group_partitions(VisualTokens(x=feats), parts, layouts)
    out = anyres.assemble(tokens, newline, "rows")
    assert out.counts.tolist() == lens.tolist()
    for b, s in enumerate(stock):
        assert torch.equal(out.x[b, : len(s)], s)


def _reference(tokens, b, policy, unpad=True):
    """Brute force: the (kind, value) sequence of image ``b`` walking the big grid cell by cell."""
    lay = tokens.layouts()[b]
    nh, nw = lay.anyres
    h, w = lay.grids[0]
    n = int(tokens.counts[b])
    idx, grp = tokens.index[b, :n].tolist(), tokens.group[b, :n].tolist()
    seq = [("tok", i) for i, gg in zip(idx, grp) if gg == 0]
    where = {}
    for i, gg in zip(idx, grp):
        if gg > 0:
            local = i - gg * h * w
            R = ((gg - 1) // nw) * h + local // w
            C = ((gg - 1) % nw) * w + local % w
            where[(R, C)] = i
    r0, r1, c0, c1 = unpad_bounds((nh * h, nw * w), lay.image_size) if unpad else (0, nh * h, 0, nw * w)
    for R in range(nh * h):
        row = [("tok", where[(R, C)]) for C in range(nw * w) if (R, C) in where and r0 <= R < r1 and c0 <= C < c1]
        seq += row
        if (policy == "rows" and row) or (policy == "unpadded_rows" and r0 <= R < r1) or policy == "all_rows":
            seq.append(("nl", R))
    return seq


@pytest.mark.parametrize("policy,unpad", [(p, True) for p in anyres.NEWLINE_POLICIES] + [("rows", False)])
def test_pruned_assembly_matches_a_brute_force_walk(policy, unpad):
    sizes = [(427, 640), (427, 200), (150, 640), (96, 96)]
    flat, parts, layouts = _partitions(sizes, crops_of=_crops)
    tokens = anyres.group_partitions(flat, parts, layouts)
    g = torch.Generator().manual_seed(2)
    keep = torch.rand(tokens.x.shape[:2], generator=g) < 0.4
    # scramble the base order (an operator may emit it in score order) and prune
    tokens = tokens.keep_mask(keep)
    perm = torch.argsort(torch.rand(tokens.x.shape[:2], generator=g) + (~tokens.valid) * 2, dim=1)
    tokens = tokens.gather(perm, tokens.mask)
    newline = torch.full((5,), 7.0)
    out = anyres.assemble(tokens, newline, policy, unpad=unpad)
    for b in range(len(sizes)):
        ref = _reference(tokens, b, policy, unpad)
        n = int(out.counts[b])
        total = layouts[b].num_tokens
        got = [("nl", i - total) if i >= total else ("tok", i) for i in out.index[b, :n].tolist()]
        assert got == ref
        is_nl = out.index[b, :n] >= total
        assert (out.x[b, :n][is_nl] == 7.0).all()
        assert not (out.x[b, :n][~is_nl] == 7.0).all(-1).any()
    if policy == "all_rows":  # GlobalCom²: a newline on every one of the nH*h rows
        nl = (out.index >= torch.tensor([lay.num_tokens for lay in layouts]).unsqueeze(1)) & out.valid
        assert nl.sum(1).tolist() == [lay.anyres[0] * lay.grids[0][0] for lay in layouts]
    if policy == "none":
        assert ((out.index < torch.tensor([lay.num_tokens for lay in layouts]).unsqueeze(1)) | ~out.valid).all()


def test_pooled_partitions_assemble_on_the_pooled_grid():
    """M3 on LLaVA-NeXT: every partition pooled 24x24 -> 6x6, then unpad and newlines on the 6x6-per-crop grid."""
    import vtc

    sizes = [(427, 640), (150, 640)]
    flat, parts, layouts = _partitions(sizes, grid=(24, 24), crops_of=_crops)
    tokens = anyres.group_partitions(flat, parts, layouts)
    pooled = vtc.create("m3", keep=36)(tokens)
    out = anyres.assemble(pooled, torch.zeros(5), "rows")
    for b, lay in enumerate(layouts):
        nh, nw = lay.anyres
        r0, r1, c0, c1 = unpad_bounds((nh * 6, nw * 6), lay.image_size)
        n = int(out.counts[b])
        n_nl = int((out.index[b, :n] >= lay.num_tokens).sum())
        assert n_nl == r1 - r0  # one newline per pooled unpadded row
        assert n == 36 + (r1 - r0) * (c1 - c0 + 1)
    # with the fine 24x24 grid, (427, 640) in 2x2 crops would unpad rows [8, 40): 8 pooled rows, not 9
    assert unpad_bounds((12, 12), (427, 640)) == (2, 10, 0, 12)


def test_group_partitions_pads_images_with_fewer_partitions():
    flat, parts, layouts = _partitions([(427, 640), (150, 640)], crops_of=_crops)
    t = anyres.group_partitions(flat, parts, layouts)
    assert parts == [5, 4]
    assert t.counts.tolist() == [60, 48]
    assert torch.equal(t.index[0], torch.arange(60))
    assert torch.equal(t.group[1, :48], torch.arange(4).repeat_interleave(12))
    assert torch.equal(t.x[1, :48], flat.x[5:9].reshape(48, -1))


def test_bad_policy_is_a_config_error():
    flat, parts, layouts = _partitions([(96, 96)], crops_of=_crops)
    with pytest.raises(ConfigError, match="newline policy"):
        anyres.assemble(anyres.group_partitions(flat, parts, layouts), torch.zeros(5), "every")
