"""Shared fixtures for the integration tests: tiny random LLaVA / LLaVA-NeXT models, a real photo,
batched processor inputs, and a content-dependent operator that keeps a different count per image."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from vtc.ops.base import OpConfig, Operator
from vtc.tokens import VisualTokens

PROMPTS = ["user : <image> what is this ? assistant :", "<image> describe", "user : what color is the <image> ?"]


@pytest.fixture(scope="session")
def photos():
    from PIL import Image
    from sklearn.datasets import load_sample_images

    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    # three aspect ratios: LLaVA-NeXT picks different crop grids and unpads differently
    return [china, flower.crop((0, 0, 200, 427)), china.crop((0, 0, 640, 150))]


@pytest.fixture(scope="session")
def llava():
    """The default tiny LLaVA: a 24x24 patch grid (576 tokens), as LLaVA-1.5."""
    from vtc.models.random import random_llava

    return random_llava()


@pytest.fixture(scope="session")
def llava_next():
    from vtc.models.random import random_llava_next

    return random_llava_next()


@pytest.fixture(scope="session")
def small_models():
    """LLaVA and LLaVA-NeXT with a 12x12 patch grid (8-px patches): 4x fewer tokens for the heavier tests."""
    from vtc.models.random import random_llava, random_llava_next

    return {"llava": random_llava(patch_size=8), "llava_next": random_llava_next(patch_size=8)}


@pytest.fixture(scope="session", params=["llava", "llava_next"])
def kind(request):
    return request.param


@pytest.fixture(scope="session")
def setup(kind, small_models, photos):
    """(kind, model, processor, batched inputs of 3 prompts/images, list of per-sample inputs), 12x12 grids."""
    model, proc = small_models[kind]
    batch = proc(images=photos, text=PROMPTS, return_tensors="pt", padding=True)
    alone = [proc(images=[im], text=[t], return_tensors="pt") for im, t in zip(photos, PROMPTS)]
    return kind, model, proc, batch, alone


@dataclass
class ThresholdConfig(OpConfig):
    channel: int = 0


class Threshold(Operator):
    """Test operator: keeps the tokens whose feature ``channel`` is positive (a count that depends on
    each image's content, so a batch holds different kept counts and each image alone keeps the same)."""

    name = "test-threshold"
    Config = ThresholdConfig
    default_stage = "vision"

    def forward(self, tokens: VisualTokens) -> VisualTokens:
        return tokens.keep_mask(tokens.x[..., self.config.channel] > 0)


@pytest.fixture
def threshold():
    return Threshold


class LMInputs:
    """Records what the language model receives (inputs_embeds, attention_mask, position_ids) per call."""

    def __init__(self, model):
        self.calls = []
        self._h = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        self.calls.append({k: kwargs.get(k) for k in ("inputs_embeds", "attention_mask", "position_ids")})

    def remove(self):
        self._h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


@pytest.fixture
def lm_inputs():
    return LMInputs


def _stock_projected(model, kind, batch):
    """Projector outputs of every image's patch tokens, stock modules: list of [n_i, D] (NeXT: all
    partitions concatenated, p*576 + raster position, then image_newline as one extra row)."""
    inner = model.model
    with torch.no_grad():
        if kind == "llava":
            hs = inner.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
            return list(inner.multi_modal_projector(hs[model.config.vision_feature_layer][:, 1:]))
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = model.config
        parts = [image_size_to_num_patches(s.tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                 for s in batch["image_sizes"]]
        pv = torch.cat([batch["pixel_values"][i, :p] for i, p in enumerate(parts)])
        hs = inner.vision_tower(pv, output_hidden_states=True).hidden_states
        proj = inner.multi_modal_projector(hs[cfg.vision_feature_layer][:, 1:])
        out, start = [], 0
        for p in parts:
            out.append(torch.cat([proj[start:start + p].reshape(-1, proj.shape[-1]), inner.image_newline[None]]))
            start += p
        return out


@pytest.fixture
def stock_projected():
    return _stock_projected
