"""vtc.taps.qwen_vl: taps on tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers (packed, SDPA).

The reference materialises each layer's full ``S x S`` attention of the packed sequence from the
block's own input (block-diagonal over the ``cu_seqlens`` the block attended with: frames, or
Qwen2.5-VL's windows), checks that it reproduces the attention module's output, and maps the
blocks' token order back to the tower's input order by matching patch embeddings (Qwen2.5-VL
reorders tokens window by window), independently of the tap's own bookkeeping.
"""

import pytest
import torch

pytest.importorskip("transformers")
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel  # noqa: E402
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import (  # noqa: E402
    Qwen2VisionTransformerPretrainedModel,
    apply_rotary_pos_emb_vision,
)
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig  # noqa: E402
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel  # noqa: E402
from transformers.vision_utils import get_vision_position_ids  # noqa: E402

from vtc.errors import InputError, TapError, UnsupportedModelError  # noqa: E402
from vtc.taps import attach, to_merged_grid, to_tokens  # noqa: E402

H = 4
SMALL = dict(num_heads=H, patch_size=2, temporal_patch_size=2, spatial_merge_size=2)


def _peaky(model):
    """Random q/k weights large enough that attention is far from uniform (a fresh tower's is nearly flat)."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.normal_(0, 0.3)
    return model.eval()


def _qwen2():
    torch.manual_seed(0)
    cfg = Qwen2VLVisionConfig(depth=3, embed_dim=32, hidden_size=48, mlp_ratio=2, **SMALL)
    return _peaky(Qwen2VisionTransformerPretrainedModel(cfg))


def _qwen25():
    """Window layers 0 and 2 (windows of 4x4 patches), full attention in layers 1 and 3."""
    torch.manual_seed(1)
    cfg = Qwen2_5_VLVisionConfig(depth=4, hidden_size=32, intermediate_size=64, window_size=8, out_hidden_size=48,
                                 fullatt_block_indexes=[1, 3], **SMALL)
    return _peaky(Qwen2_5_VisionTransformerPretrainedModel(cfg))


def _qwen3():
    torch.manual_seed(2)
    cfg = Qwen3VLVisionConfig(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=48,
                              num_position_embeddings=64, deepstack_visual_indexes=[1], **SMALL)
    return _peaky(Qwen3VLVisionModel(cfg))


TOWERS = {"qwen2": _qwen2, "qwen2.5": _qwen25, "qwen3": _qwen3}
# two images of different sizes and a 2-frame video: each frame is its own attention segment
GRID = torch.tensor([[1, 4, 6], [1, 6, 8], [2, 4, 4]])


def _pixels(grid, seed=3):
    S = int(grid.prod(1).sum())
    return torch.randn(S, 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(TOWERS))
def tower(request):
    return TOWERS[request.param]()


def reference(model, px, grid, segments="tower"):
    """Per layer, in the tower's input order: attn_received, key_norms, keys and block outputs, brute force.

    ``segments="frames"``: attend within whole frames in every layer (not what Qwen2.5-VL's window
    layers do; the module-output check is then skipped)."""
    seen, hooks = {}, []
    for l, blk in enumerate(model.blocks):
        def pre(m, args, kw, l=l):
            seen[l] = (args[0], kw["cu_seqlens"], kw["position_embeddings"])

        hooks.append(blk.attn.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(blk.attn.register_forward_hook(lambda m, a, o, l=l: seen.__setitem__(("out", l), o)))
        hooks.append(blk.register_forward_hook(lambda m, a, o, l=l: seen.__setitem__(("hidden", l), o)))
    hooks.append(model.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0])))
    with torch.no_grad():
        pooled = model(px, grid_thw=grid).pooler_output
        embedded = model.patch_embed(px)
    for h in hooks:
        h.remove()
    if isinstance(model, Qwen3VLVisionModel):
        perm = torch.arange(embedded.shape[0])  # position embeddings are added after patch_embed: no reorder
    else:  # block position p holds tower token perm[p] (Qwen2.5-VL: window order)
        perm = torch.cdist(seen["in"], embedded).argmin(1)
        assert torch.equal(perm.sort().values, torch.arange(len(perm)))
    frame = torch.repeat_interleave(_frames(grid), _frames(grid)).float()
    out = {}
    for l, blk in enumerate(model.blocks):
        x, cu, (cos, sin) = seen[l]
        S = x.shape[0]
        with torch.no_grad():
            q, k, v = blk.attn.qkv(x).reshape(S, 3, H, -1).unbind(1)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            if segments == "frames":
                cu = torch.nn.functional.pad(_frames(grid).cumsum(0), (1, 0))
            seg = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
            logits = torch.einsum("ihd,jhd->hij", q, k) * blk.attn.scaling
            logits = logits.masked_fill(seg[:, None] != seg[None, :], float("-inf"))
            A = logits.softmax(-1)  # [H, S, S]: the full packed map, reference only
            att = blk.attn.proj(torch.einsum("hij,jhd->ihd", A, v).reshape(S, -1))
        if segments == "tower":
            torch.testing.assert_close(att, seen[("out", l)], atol=1e-5, rtol=1e-5)  # the map is the tower's
        tower_order = torch.empty_like(perm)
        tower_order[perm] = torch.arange(S)  # x_tower = x_blocks[tower_order]
        out[l] = {
            "attn_received": A.mean(0).sum(0)[tower_order] / frame,
            "key_norms": k.norm(dim=-1).mean(1)[tower_order],
            "keys": k.mean(1)[tower_order],
            "hidden": seen[("hidden", l)][tower_order],
        }
    return out, pooled


def _frames(grid):
    """Token count of each frame: h*w repeated t times."""
    return (grid[:, 1] * grid[:, 2]).repeat_interleave(grid[:, 0])


ALL = ["attn_received", "key_norms", "keys", "hidden"]


def test_signals_equal_the_brute_force_packed_attention(tower):
    px = _pixels(GRID)
    ref, pooled = reference(tower, px, GRID)
    L = len(tower.blocks)
    with attach(tower, {name: list(range(L)) for name in ALL}) as tap, torch.no_grad():
        out = tower(px, grid_thw=GRID)
    assert torch.equal(out.pooler_output, pooled)  # the tap changes nothing
    assert tap.image_token_counts == [24, 48, 32] and tap.num_tokens == 104
    for l in range(L):
        for name in ALL:
            torch.testing.assert_close(tap.signals[name][l], ref[l][name], atol=2e-6, rtol=1e-5)
    # hidden is in the tower's input order: the merger on it gives the tower's own merged output
    torch.testing.assert_close(tower.merger(tap.signal("hidden", "feature")), out.pooler_output, atol=1e-6, rtol=1e-6)
    # per frame, attn_received sums to 1 (each query row's softmax sums to 1 over its segment)
    frames = tap.signals["attn_received"][0].split(_frames(GRID).tolist())
    torch.testing.assert_close(torch.stack([f.sum() for f in frames]), torch.ones(4))


def test_each_image_gets_its_own_result(tower):
    """Packed with other images of other sizes, an image's signals equal those of a run on it alone."""
    px = _pixels(GRID)
    sizes = GRID.prod(1).tolist()
    req = {"attn_received": [0, -1], "key_norms": ["last"]}
    with attach(tower, req) as tap, torch.no_grad():
        tower(px, grid_thw=GRID)
        packed = {(n, l): tap.per_image(n, l) for n in req for l in req[n]}
        for i, part in enumerate(px.split(sizes)):
            tower(part, grid_thw=GRID[i:i + 1])
            for (n, l), per in packed.items():
                assert per[i].shape == (sizes[i],)
                torch.testing.assert_close(per[i], tap.per_image(n, l)[0], atol=1e-6, rtol=1e-5)


def test_window_layers_are_read_within_their_windows():
    """Qwen2.5-VL's layer 0 attends within 4x4-patch windows: its signal is the windowed map's, not a full frame's."""
    model = _qwen25()
    px = _pixels(GRID)
    windows, _ = reference(model, px, GRID)
    frames, _ = reference(model, px, GRID, segments="frames")
    with attach(model, {"attn_received": [0, 1]}) as tap, torch.no_grad():
        model(px, grid_thw=GRID)
    got = tap.signals["attn_received"]
    torch.testing.assert_close(got[0], windows[0]["attn_received"], atol=2e-6, rtol=1e-5)
    assert (got[0] - frames[0]["attn_received"]).abs().max() > 1e-2  # a full-frame reading would differ
    torch.testing.assert_close(got[1], frames[1]["attn_received"], atol=2e-6, rtol=1e-5)  # layer 1 is full attention


def test_chunking_equals_one_chunk_and_never_holds_a_segment_square(tower, shapes):
    px = _pixels(GRID)
    rec = shapes()
    with torch.no_grad():
        with attach(tower, {"attn_received": [0, 1]}) as one:
            tower(px, grid_thw=GRID)
        with attach(tower, {"attn_received": [0, 1]}, max_chunk_elements=2 * H * 48) as chunked, rec:
            tower(px, grid_thw=GRID)
    for l in (0, 1):
        torch.testing.assert_close(chunked.signals["attn_received"][l], one.signals["attn_received"][l],
                                   atol=1e-7, rtol=1e-6)
    assert not [s for s in rec.shapes if len(s) >= 2 and s[-2:] in {(48, 48), (24, 24)}]  # the image segments
    with attach(tower, {"attn_received": [1]}, max_chunk_elements=10**9) as _, shapes() as control, torch.no_grad():
        tower(px, grid_thw=GRID)
    assert any(s[-2:] == (48, 48) for s in control.shapes if len(s) >= 2)  # the check can see one


def test_to_merged_grid_averages_each_2x2_cell_in_merged_raster_order(tower):
    px = _pixels(GRID[:2])
    with attach(tower, {"key_norms": [0]}) as tap, torch.no_grad():
        merged = tower(px, grid_thw=GRID[:2]).pooler_output
    per = tap.per_image("key_norms", 0)
    pos = get_vision_position_ids(GRID[:2], 2).split(GRID[:2].prod(1).tolist())  # (row, col) of each patch
    got = [to_merged_grid(s) for s in per]
    assert sum(g.shape[0] for g in got) == merged.shape[0]  # one value per merged token the LLM receives
    for s, p, (_, h, w), g in zip(per, pos, GRID[:2].tolist(), got):
        cell = (p[:, 0] // 2) * (w // 2) + p[:, 1] // 2  # raster index in the merged h/2 x w/2 grid
        want = torch.zeros(h * w // 4).index_add_(0, cell, s) / 4
        torch.testing.assert_close(g, want)
        torch.testing.assert_close(to_merged_grid(s, reduce="sum"), want * 4)
        torch.testing.assert_close(to_merged_grid(s, reduce="max"), torch.zeros(h * w // 4).scatter_reduce_(
            0, cell, s, "amax", include_self=False))
    with pytest.raises(InputError, match="multiple of 4"):
        to_merged_grid(per[0][:5])
    with pytest.raises(InputError, match="reduce="):
        to_merged_grid(per[0], reduce="median")


def test_layers_resolve_against_the_tower_and_cls_signals_are_refused(tower):
    L = len(tower.blocks)
    with attach(tower, {"attn_received": ["feature", -1, 0], "hidden": ["last"]}) as tap:
        assert tap.requires == {"attn_received": [0, L - 1], "hidden": [L - 1]}
        assert tap.layer_space.feature_layer == L - 1 and tap.packed
    for name in ("cls_attn", "cls_logits"):
        with pytest.raises(TapError, match="no CLS token.*'attn_received'.*'key_norms'"):
            attach(tower, {name: [0]})
    with pytest.raises(TapError, match=f"this tower has {L} layers"):
        attach(tower, {"key_norms": [L]})


def test_to_tokens_points_packed_towers_to_per_image(tower):
    with attach(tower, {"key_norms": [0]}) as tap, torch.no_grad():
        out = tower(_pixels(GRID[:1]), grid_thw=GRID[:1])
    with pytest.raises(TapError, match="per_image"):
        to_tokens(out.last_hidden_state[None], tap)


def test_remove_leaves_the_tower_as_it_was(tower, snapshot):
    before = snapshot(tower)
    with attach(tower, {name: [0, 1] for name in ALL}):
        assert snapshot(tower) != before
    assert snapshot(tower) == before


def test_a_whole_qwen_vl_model_is_refused_with_a_hint():
    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Identity()

    class QwenLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

    QwenLike.__module__ = "transformers.models.qwen2_vl.modeling_qwen2_vl"
    with pytest.raises(UnsupportedModelError, match="model.model.visual"):
        attach(QwenLike(), {"key_norms": [0]})
