"""vtc.bench.flops.tap_flops against FlopCounterMode: the FLOPs a tap adds to a tower forward.

Each tiny tower runs twice under FlopCounterMode, bare and with a ``vtc.taps`` tap recording a mix
of signals (CLS rows, attention received, keys, key norms) at layers given in every form; the
difference is what the tap computed, and must equal the analytic count exactly.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vtc.bench import flops as F
from vtc.taps import attach

REQUIRES = {"cls_attn": [0, "feature"], "cls_logits": ["feature"], "attn_received": ["1/3", "last"],
            "keys": ["feature"], "key_norms": [-1]}
CLS_FREE = {k: v for k, v in REQUIRES.items() if not k.startswith("cls")}


def _tap_cost(tower, run, requires, **kw):
    def count(fn):
        fc = FlopCounterMode(display=False)
        with torch.no_grad(), fc:
            fn()
        return fc.get_total_flops()

    bare = count(run)
    with attach(tower, requires, **kw) as tap:
        tapped = count(run)
        assert set(tap.signals) == set(requires)
    return tapped - bare


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_towers(kind):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    clip = kind == "clip"
    cfg_cls, model_cls = (CLIPVisionConfig, CLIPVisionModel) if clip else (SiglipVisionConfig, SiglipVisionModel)
    torch.manual_seed(0)
    cfg = cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
                  patch_size=8)
    tower = model_cls(cfg).eval()
    requires = REQUIRES if kind == "clip" else CLS_FREE
    px = torch.randn(2, 3, 32, 32)
    got = _tap_cost(tower, lambda: tower(px), requires, feature_layer=2)
    v = F.vision_shape(cfg, feature_layer=2)
    assert got == F.tap_flops(v, requires, passes=2) > 0
    N, D = 16, 32  # SigLIP: 4x4 patches, no CLS
    if kind == "siglip":  # attention received at layers 1 and 3 of 2 images: every row against every key
        assert got == 2 * 2 * (2 * N * N * D)


def test_open_clip_reprojects_what_it_needs():
    pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    tower = VisionTransformer(image_size=32, patch_size=8, width=32, layers=4, heads=4, mlp_ratio=2.0,
                              output_dim=16).eval()
    px = torch.randn(2, 3, 32, 32)
    got = _tap_cost(tower, lambda: tower(px), REQUIRES, feature_layer=2)
    v = F.VisionShape(layers=4, hidden=32, intermediate=64, image_size=32, patch_size=8, heads=4, feature_layer=2,
                      fused_qkv=True)
    assert got == F.tap_flops(v, REQUIRES, passes=2)
    assert F.tap_flops(v, REQUIRES, passes=2) > F.tap_flops(F.VisionShape(**{**v.__dict__, "fused_qkv": False}),
                                                             REQUIRES, passes=2)


def test_qwen2_5_vl_window_and_full_layers():
    """A packed tower: attention received within each window in window layers, the whole image in the others;
    the VisionShape is the one the Qwen VL adapter reads from a model config."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, window_size=8, out_hidden_size=48,
                           fullatt_block_indexes=[1, 3], num_heads=4, patch_size=2, temporal_patch_size=2,
                           spatial_merge_size=2),
        text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]}))
    torch.manual_seed(1)
    tower = Qwen2_5_VisionTransformerPretrainedModel(cfg.vision_config).eval()
    grid = torch.tensor([[1, 8, 8], [1, 4, 12]])
    px = torch.randn(int(grid.prod(1).sum()), 3 * 2 * 2 * 2)
    requires = {"attn_received": [0, 1, "last"], "key_norms": [2], "keys": ["feature"]}
    got = _tap_cost(tower, lambda: tower(px, grid_thw=grid), requires)
    v = F.ModelShape.from_config(cfg).vision
    assert (v.heads, v.feature_layer, v.window, v.full_attention_layers) == (4, 3, 4, (1, 3))
    assert got == F.tap_flops(v, requires, grids=[(8, 8), (4, 12)])
    # window layer 0: 4x4-patch windows (8x8: four of 16; 4x12: three of 16), full layers 1 and 3: the images
    windows, full = 4 * 16**2 + 3 * 16**2, 64**2 + 48**2
    assert got == 2 * 32 * (windows + 2 * full)
