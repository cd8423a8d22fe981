"""Vision towers: feature-layer tokens from Hugging Face and timm ViTs, by hooks, never by copying forwards.

``feature_layer`` follows LLaVA's ``vision_feature_layer``, an index into Hugging Face's
``hidden_states`` tuple: entry 0 is the embeddings (input of block 0), entry ``i`` the output of
block ``i-1``, so ``-2`` is the output of the penultimate block (layer 22 of CLIP-L's 24). A list of
layers concatenates them along features, as LLaVA does. Hugging Face towers are called with
``output_hidden_states=True``; timm ViTs get forward hooks on ``blocks[i]`` that record the
outputs asked for. ``prefix_tokens`` tells how many leading tokens (CLS, distillation, registers)
precede the patch tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vtc.errors import ConfigError, UnsupportedModelError

__all__ = ["is_hf_tower", "is_timm_vit", "num_blocks", "prefix_tokens", "hidden_states", "feature_tokens"]


def is_hf_tower(tower: nn.Module) -> bool:
    """A transformers vision model (CLIPVisionModel, SiglipVisionModel, ...)."""
    return hasattr(tower, "config") and type(tower).__module__.startswith("transformers.")


def is_timm_vit(tower: nn.Module) -> bool:
    """A timm VisionTransformer-like model (``blocks``, ``patch_embed``, ``num_prefix_tokens``)."""
    return hasattr(tower, "blocks") and hasattr(tower, "patch_embed") and hasattr(tower, "num_prefix_tokens")


def num_blocks(tower: nn.Module) -> int:
    if is_timm_vit(tower):
        return len(tower.blocks)
    cfg = getattr(tower, "config", None)
    n = getattr(cfg, "num_hidden_layers", None)
    if n is None:
        raise UnsupportedModelError(f"cannot tell how many layers the vision tower {type(tower).__name__} has")
    return int(n)


def prefix_tokens(tower: nn.Module) -> int:
    """Leading non-patch tokens of the tower's sequence (1 for CLIP's CLS, 0 for SigLIP)."""
    if is_timm_vit(tower):
        return int(tower.num_prefix_tokens)
    emb = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
    return 1 if emb is not None and hasattr(emb, "class_embedding") else 0


def _layer_list(layers: int | Sequence[int]) -> list[int]:
    return [int(layers)] if isinstance(layers, int) else [int(l) for l in layers]


def hidden_states(tower: nn.Module, pixel_values: Tensor, layers: int | Sequence[int]) -> list[Tensor]:
    """The tower's hidden states at ``layers`` (Hugging Face ``hidden_states`` indexing), full sequence."""
    wanted = _layer_list(layers)
    depth = num_blocks(tower)
    for l in wanted:
        if not -(depth + 1) <= l <= depth:
            raise ConfigError(f"feature layer {l} is outside the tower's hidden states (0..{depth}, or negative)")
    if is_timm_vit(tower):
        pos = sorted({l % (depth + 1) for l in wanted})
        got: dict[int, Tensor] = {}
        handles = []
        try:
            for p in pos:
                if p == 0:
                    handles.append(tower.blocks[0].register_forward_pre_hook(
                        lambda _m, args: got.__setitem__(0, args[0])))
                else:
                    handles.append(tower.blocks[p - 1].register_forward_hook(
                        lambda _m, _a, out, p=p: got.__setitem__(p, out)))
            tower.forward_features(pixel_values)
        finally:
            for h in handles:
                h.remove()
        return [got[l % (depth + 1)] for l in wanted]
    if is_hf_tower(tower):
        out = tower(pixel_values, output_hidden_states=True, return_dict=True)
        return [out.hidden_states[l] for l in wanted]
    raise UnsupportedModelError(
        f"vtc reads features from Hugging Face vision models and timm VisionTransformers, not {type(tower).__name__}; "
        "compute the features yourself and pass them to VisualCompressor.compress(features)"
    )


def feature_tokens(tower: nn.Module, pixel_values: Tensor, layers: int | Sequence[int], drop_prefix: int) -> Tensor:
    """Patch tokens ``[B, N, D]`` at the feature layer(s), the first ``drop_prefix`` tokens removed."""
    hs = hidden_states(tower, pixel_values, layers)
    feats = [h[:, drop_prefix:] for h in hs]
    return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
