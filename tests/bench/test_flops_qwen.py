"""vtc.bench.flops on the Qwen VL family against torch.utils.flop_counter.FlopCounterMode.

The tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL run for real (eager attention: FlopCounterMode does
not see CPU SDPA kernels) on images of three sizes, so the towers see uneven grids and Qwen2.5-VL's
windows do not tile them evenly. Qwen2.5-VL-7B's tower, at its real widths, window size and
full-attention pattern (depth cut to 8 layers), runs on the meta device.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vtc.bench import flops as F
from vtc.integrations.adapters import adapter_for

QWEN_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
QWEN_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584, spatial_merge_size=2,
                      temporal_patch_size=2, hidden_act="silu")


def _counts(fn):
    fc = FlopCounterMode(display=False)
    with torch.no_grad(), fc:
        fn()
    return fc.get_total_flops(), {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}


@pytest.mark.parametrize("builder", ["random_qwen2_vl", "random_qwen2_5_vl", "random_qwen3_vl"])
def test_tiny_qwen_vl(builder):
    from PIL import Image

    from vtc.models import random as R

    model, proc = getattr(R, builder)()
    model.set_attn_implementation("eager")
    rng = np.random.default_rng(0)
    ims = [Image.fromarray((rng.random(s) * 255).astype("uint8")) for s in ((48, 64, 3), (80, 40, 3), (96, 96, 3))]
    batch = proc(images=ims, text=[f"{R.QWEN_IMAGE} a", f"{R.QWEN_IMAGE} b {R.QWEN_IMAGE} c"], return_tensors="pt",
                 padding=True)
    total, counts = _counts(lambda: model(**batch))
    ad = adapter_for(model)
    shape = F.ModelShape.from_model(model)
    per_prompt = ad.tower_grids(batch)
    assert [len(g) for g in per_prompt] == [1, 2]
    grids = [g for per in per_prompt for g in per]
    merged = sum(h * w for h, w in grids) // 4
    mergers = sum(v for k, v in counts.items() if re.search(r"visual\.(merger|deepstack_merger_list\.\d+)$", k))
    tower = next(v for k, v in counts.items() if k.endswith("model.visual")) - mergers
    assert F.vision_flops(shape.vision, grids=grids) == tower
    assert F.projector_flops(shape, merged) == mergers
    B, L = batch["input_ids"].shape
    assert F.vision_flops(shape.vision, grids=grids) + F.projector_flops(shape, merged) + \
        B * F.prefill_flops(shape.lm, L, logits=L) == total
    # per question, as the bench counts it: operators see the merged LLM-width tokens
    import vtc

    est = F.estimate(shape, text_tokens=5, kept_tokens=16, new_tokens=2, grids=per_prompt[1],
                     pipeline=vtc.build("divprune:keep=16"))
    n = sum(h * w for h, w in per_prompt[1]) // 4
    assert est["projector"] == F.projector_flops(shape, n)
    assert est["ops"] == 2 * n * n * shape.lm.hidden + 2 * n * shape.lm.hidden


def test_qwen2_5_vl_7b_shapes_and_tower_on_meta():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    shape = F.ModelShape.from_config(Qwen2_5_VLConfig(vision_config=QWEN_7B_VISION, text_config=QWEN_7B_TEXT))
    assert shape.lm == F.LMShape(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128,
                                 vocab=152064)  # GQA: 4 key/value heads
    assert shape.projector == ((5120, 5120), (5120, 3584))  # the 2x2 merger over 1280-wide patches
    v = shape.vision
    assert (v.window, v.full_attention_layers, v.gated_mlp, v.merge, v.temporal_patch) == (8, (7, 15, 23, 31), True,
                                                                                          2, 2)
    # the tower at its real widths, 8 layers deep (two of them global), on a 504x700 image (36x50 patches)
    cut = Qwen2_5_VLConfig(vision_config={**QWEN_7B_VISION, "depth": 8, "fullatt_block_indexes": [3, 7]},
                           text_config=QWEN_7B_TEXT).vision_config
    cut._attn_implementation = "eager"
    with torch.device("meta"):
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(cut)
    grid = torch.tensor([[1, 36, 50]])
    window_index, cu_windows = get_vision_window_index(grid, 2, 112, 14)
    pre = dict(position_ids=get_vision_position_ids(grid, 2).to("meta"), cu_seqlens=get_vision_cu_seqlens(grid),
               window_index=window_index.to("meta"), cu_window_seqlens=cu_windows)
    pv = torch.zeros(36 * 50, 3 * 2 * 14 * 14, device="meta")
    total, counts = _counts(lambda: tower(pv, grid_thw=grid, **pre))
    merger = next(v for k, v in counts.items() if k.endswith("merger"))
    small = F.ModelShape.from_config(Qwen2_5_VLConfig(vision_config=cut.to_dict(), text_config=QWEN_7B_TEXT))
    assert F.vision_flops(small.vision, grids=[(36, 50)]) == total - merger
    assert F.projector_flops(small, 36 * 50 // 4) == merger
