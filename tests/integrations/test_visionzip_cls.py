"""VisionZip official through vtc.apply: the adapters hand in the tower's CLS token.

The reference recomputes VisionZip's rule from the tower's own hidden states (CLS attention and
head-mean keys of the feature layer from its q/k projections, no tap): the LLM receives
``[CLS, dominant patches in raster order, contextual tokens]`` per image (per LLaVA-NeXT partition),
the CLS token projected like the patches.
"""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.errors import ConfigError

D, C = 6, 4  # dominant (the CLS token included) and contextual tokens


def _reference(model, pixel_values):
    """Per image: (indices, projected features) of VisionZip official, from the tower's feature layer."""
    tower = model.model.vision_tower
    hs = tower(pixel_values, output_hidden_states=True).hidden_states
    layer = len(hs) - 3  # vision_feature_layer -2: the output of layer L-2, whose input is hidden_states[L-2]
    block = getattr(tower, "vision_model", tower).encoder.layers[layer]
    attn, x = block.self_attn, block.layer_norm1(hs[layer])
    B, N1, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    q = attn.q_proj(x).view(B, N1, H, d).transpose(1, 2)
    k = attn.k_proj(x).view(B, N1, H, d).transpose(1, 2)
    probs = (q[:, :, :1] @ k.transpose(-1, -2) * attn.scale).softmax(-1)[:, :, 0]  # [B, H, N1]
    score, keys, feats = probs.mean(1)[:, 1:], k.mean(1)[:, 1:], hs[layer + 1]
    out = []
    for b in range(B):
        n = score.shape[1]
        dom = sorted(sorted(range(n), key=lambda j: (-float(score[b, j]), j))[:D - 1])
        rem = [j for j in range(n) if j not in dom]
        step = max(1, len(rem) // C)
        targets = rem[::step][:C]
        m = keys[b] / keys[b].norm(dim=-1, keepdim=True)
        joined = {t: [] for t in targets}
        for j in rem:
            if j not in targets:
                sims = [float(m[j] @ m[t]) for t in targets]
                joined[targets[sims.index(max(sims))]].append(j)
        rows = [feats[b, 0]] + [feats[b, 1 + j] for j in dom]
        for t in targets:
            extra = feats[b, [1 + j for j in joined[t]]].mean(0) if joined[t] else torch.zeros_like(feats[b, 0])
            rows.append(feats[b, 1 + t] + extra)
        out.append(([-1] + dom + targets, model.model.multi_modal_projector(torch.stack(rows))))
    return out


@torch.no_grad()
def test_llava_feeds_cls_dominant_and_contextual_tokens(small_models, photos):
    model, proc = small_models["llava"]
    inputs = proc(images=photos[:2], text=["<image> what is this ?"] * 2, return_tensors="pt", padding=True)
    with vtc.apply(model, f"visionzip:dominant={D},contextual={C}") as h:
        model(**inputs)
    assert h.last.counts == [D + C, D + C]
    for b, (index, x) in enumerate(_reference(model, inputs["pixel_values"])):
        assert h.last.index[b].tolist() == index
        torch.testing.assert_close(h.last.tokens.x[b], x, atol=1e-5, rtol=1e-5)
    with vtc.apply(model, f"visionzip:keep={D + C}"):  # keep= splits into 9 + 1: the LLM gets keep tokens
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1] - (144 - D - C)


@torch.no_grad()
def test_llava_next_gives_every_partition_its_cls_token(small_models, photos):
    model, proc = small_models["llava_next"]
    inputs = proc(images=photos[:2], text=["<image> what is this ?"] * 2, return_tensors="pt", padding=True)
    with vtc.apply(model, f"visionzip:dominant={D},contextual={C}", unpad=False) as h:
        model(**inputs)
    parts = [5, 4]  # base + 2x2 crops, base + 1x3 crops (the two photos' grids on the tiny pinpoints)
    assert h.last.counts == [(D + C) * p for p in parts]
    for b, P in enumerate(parts):
        index, group = h.last.index[b].tolist(), h.last.tokens.group[b, :h.last.counts[b]].tolist()
        assert index[0] == -1 and index.count(-1) == P  # the base's CLS first, one per partition
        assert index[-(P - 1):] == [-1] * (P - 1) and group[-(P - 1):] == list(range(1, P))  # crops' CLS last
        assert group[:D + C] == [0] * (D + C)  # the base partition's tokens first, in VisionZip's order


def test_the_cls_token_goes_to_the_first_operator_only(small_models):
    model, _ = small_models["llava"]
    with pytest.raises(ConfigError, match="must be the first operator"):
        vtc.apply(model, "random:keep=50 | visionzip:keep=10")
    assert "forward" not in model.__dict__
    vtc.apply(model, "random:keep=50 | visionzip:keep=10,compat=clean").remove()
