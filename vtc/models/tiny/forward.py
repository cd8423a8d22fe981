"""The embedded models' forward pass for training and evaluation, with visual-token subsets.

Runs the stock HF modules of a LLaVA / LLaVA-NeXT model piece by piece (no forward body copied):
the vision tower (``hidden_states``), the projector (or an MQT projector), LLaVA-NeXT's own
``pack_image_features`` (unpadding and newline tokens), then the language model on
``inputs_embeds`` built here, so a step can feed any subset of the visual tokens. Each sample's
row is ``prefix | visual tokens | suffix``, right-padded: causal attention then needs no mask.
Position ids are contiguous (renumbered, DivPrune-style) or original (the positions the kept tokens
had in the full sequence, FastV-style). With all tokens and contiguous positions the result equals
the HF model's own forward on the processor's inputs (checked by the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtc.integrations.adapters import adapter_for

__all__ = ["VisionOut", "partitions_per_image", "encode_images", "random_subset", "assemble", "lm_hidden",
           "loss_and_logits"]


@dataclass
class VisionOut:
    """Visual tokens in LLM space and what the tower gave (for aux losses and vision-stage ops)."""

    tokens: Tensor  # [B, N, D] LLM-space visual tokens, left-packed
    valid: Tensor  # [B, N] bool
    patches: Tensor  # [X, n, Dv] feature-layer patch features of every tower pass
    cls: Tensor  # [X, Dv] last-layer CLS after post_layernorm


def partitions_per_image(pinpoints, view: int, image_sizes: Tensor) -> list[int]:
    """Tower passes per image under AnyRes (base view + crops), as HF's processor makes them."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [int(image_size_to_num_patches(s, pinpoints, view)) for s in image_sizes]


def tower(model, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
    """``(patch features at the LLaVA feature layer [X, n, Dv], pooled last-layer CLS [X, Dv])``."""
    vt = adapter_for(model).vision_tower
    out = vt(pixel_values, output_hidden_states=True)
    feats = out.hidden_states[model.config.vision_feature_layer][:, 1:]
    cls = vt.post_layernorm(out.last_hidden_state[:, 0])
    return feats, cls


def encode_images(model, pixel_values: Tensor, image_sizes: Tensor | None = None, *, mqt=None,
                  m: int | None = None) -> VisionOut:
    """Visual tokens of a batch: projector (or ``mqt`` with ``m`` queries) over the tower features;
    for LLaVA-NeXT, partitions are packed by the model's own ``pack_image_features``."""
    if image_sizes is None:
        feats, cls = tower(model, pixel_values)
        x = adapter_for(model).projector(feats) if mqt is None else mqt(feats, m)
        return VisionOut(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), feats, cls)
    cfg = model.config
    parts = partitions_per_image(cfg.image_grid_pinpoints, cfg.vision_config.image_size, image_sizes)
    flat = torch.cat([pv[:p] for pv, p in zip(pixel_values, parts)])
    feats, cls = tower(model, flat)
    proj = adapter_for(model).projector(feats)
    packed, _ = model.model.pack_image_features(list(torch.split(proj, parts)), image_sizes, "default",
                                                image_newline=model.model.image_newline)
    n = torch.tensor([p.shape[0] for p in packed], device=proj.device)
    x = torch.nn.utils.rnn.pad_sequence(list(packed), batch_first=True)
    valid = torch.arange(x.shape[1], device=x.device) < n[:, None]
    return VisionOut(x, valid, feats, cls)


def random_subset(valid: Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(idx [B, k'], keep_valid [B, k'])``: ``min(k, n_b)`` random valid positions per row, ascending."""
    B, N = valid.shape
    scores = torch.rand(B, N, generator=generator).to(valid.device).masked_fill(~valid, -1.0)
    kk = min(k, N)
    top = scores.topk(kk, dim=1).indices
    ok = valid.gather(1, top)
    idx = torch.sort(torch.where(ok, top, torch.full_like(top, N)), dim=1).values
    ok = idx < N
    return idx.clamp_max(N - 1), ok


def assemble(model, prefix: Tensor, vis: Tensor, vis_valid: Tensor, suffix: Tensor, lengths: Tensor,
             vis_pos: Tensor | None = None, n_full: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(inputs_embeds [B, T, D], position_ids [B, T], suffix_start [B])`` for rows
    ``prefix | vis (its valid tokens) | suffix`` right-padded to T.

    ``vis_pos [B, k]`` (original positions of the kept tokens) and ``n_full [B]`` (visual tokens
    before subsetting) give original position ids; without them positions are contiguous.
    """
    emb = model.get_input_embeddings()
    B, K, D = vis.shape
    P0 = prefix.numel()
    n = vis_valid.sum(1)
    start = P0 + n
    T = int((start + lengths).max())
    dev = vis.device
    out = torch.zeros(B, T, D, dtype=vis.dtype, device=dev)
    rows = torch.arange(B, device=dev)[:, None]
    out[:, :P0] = emb(prefix.to(dev)).to(vis.dtype).unsqueeze(0)
    j = torch.arange(K, device=dev)[None]
    dst = torch.where(vis_valid, P0 + j, T)  # vis tokens are left-packed
    out_ext = torch.cat([out, out.new_zeros(B, 1, D)], 1)
    out_ext[rows.expand(B, K), dst] = vis
    L = suffix.shape[1]
    js = torch.arange(L, device=dev)[None]
    sdst = torch.where(js < lengths[:, None], start[:, None] + js, T)
    out_ext[rows.expand(B, L), sdst] = emb(suffix.to(dev)).to(vis.dtype)
    inputs = out_ext[:, :T]
    pos = torch.arange(T, device=dev).expand(B, T).clone()
    if vis_pos is not None:
        nf = n_full if n_full is not None else n
        pos_ext = torch.cat([pos, pos.new_zeros(B, 1)], 1)
        pos_ext[rows.expand(B, K), dst] = P0 + vis_pos
        pos_ext[rows.expand(B, L), sdst] = (P0 + nf[:, None] + js).expand(B, L)
        pos = pos_ext[:, :T]
    return inputs, pos, start


def lm_hidden(model, inputs_embeds: Tensor, position_ids: Tensor) -> Tensor:
    """Last hidden states of the language model (causal, no padding mask needed: pads are at the end)."""
    return adapter_for(model).language_model(inputs_embeds=inputs_embeds, position_ids=position_ids,
                                             use_cache=False).last_hidden_state


def loss_and_logits(model, hidden: Tensor, start: Tensor, suffix: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of the ``target`` suffix tokens (token ``j`` predicted at position ``start + j - 1``)."""
    b, j = target.nonzero(as_tuple=True)
    h = hidden[b, start.to(hidden.device)[b] + j - 1]
    logits = model.lm_head(h).float()
    return F.cross_entropy(logits, suffix.to(hidden.device)[b, j])
