"""Tap adapter for open_clip's ``VisionTransformer`` (``model.visual`` of a CLIP model).

Layer ``l`` is ``transformer.resblocks[l]``, the same numbering as Hugging Face's
``encoder.layers[l]`` (``ln_pre`` is not a layer). The CLS token comes first.

Its blocks attend with ``torch.nn.MultiheadAttention``, which projects q, k and v inside one
functional call from the packed ``in_proj_weight``: there is no projection module to hook. A
forward pre-hook on the attention reads its input ``x`` instead and computes the CLS row with
:func:`vtc.attention.cls_attention_from_input`, which folds the CLS query into the key projection
(``O(N·D)`` per head, never projecting the ``N`` keys), and head-mean keys with
:func:`vtc.attention.head_mean_keys_from_input` (``1/H`` of a key projection). The CLS-free
signals need every head's keys (``key_norms``) and queries (``attn_received``): those are projected
from ``x`` with the same weights, once per layer and only when asked for. Blocks built with
open_clip's own ``Attention`` (``CustomResidualAttentionBlock``: qk-norm, cosine attention) are not
supported.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vtc.attention import cls_attention_from_input, head_mean_keys_from_input
from vtc.errors import TapError, UnsupportedModelError
from vtc.taps.tap import CLS_FREE_SIGNALS, CLS_SIGNALS, Tap, TowerAdapter

__all__ = ["OpenClipVitAdapter"]

#: nn.MultiheadAttention.forward's positional parameters, in order
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")


class OpenClipVitAdapter(TowerAdapter):
    """Hooks for ``open_clip.transformer.VisionTransformer`` (see the module docstring)."""

    def __init__(self, tower: nn.Module) -> None:
        from open_clip.transformer import VisionTransformer

        if not isinstance(tower, VisionTransformer):
            raise UnsupportedModelError(
                f"vtc taps support open_clip's VisionTransformer (model.visual), not {type(tower).__name__}"
            )
        blocks = tower.transformer.resblocks
        bad = {type(getattr(b, "attn", None)).__name__ for b in blocks
               if not isinstance(getattr(b, "attn", None), nn.MultiheadAttention)}
        if bad:
            raise UnsupportedModelError(
                "vtc taps support open_clip blocks that attend with torch.nn.MultiheadAttention; this tower's "
                f"blocks use {', '.join(sorted(bad))} (custom blocks: qk_norm / scaled cosine attention)"
            )
        self.blocks = blocks
        self.family = "open_clip VisionTransformer"
        self.num_layers = len(blocks)
        self.has_cls = True
        self.num_prefix_tokens = 1
        self.seq_dim = 1 if getattr(tower.transformer, "batch_first", True) else 0
        grid = getattr(tower, "grid_size", None)
        if grid is not None and len(grid) == 2:
            self.grid = (int(grid[0]), int(grid[1]))

    def layer(self, l: int) -> nn.Module:
        return self.blocks[l]

    def hook_attention(self, l: int, want: frozenset[str], tap: Tap) -> list[RemovableHandle]:
        mha: nn.MultiheadAttention = self.blocks[l].attn
        H = mha.num_heads
        D = mha.embed_dim
        scale = 1.0 / math.sqrt(D // H)

        def projections() -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
            b = mha.in_proj_bias
            if mha.in_proj_weight is not None:
                w = mha.in_proj_weight
                wq, wk = w[:D], w[D:2 * D]
            else:
                wq, wk = mha.q_proj_weight, mha.k_proj_weight
            return wq, None if b is None else b[:D], wk, None if b is None else b[D:2 * D]

        def before_attention(module: nn.Module, args: tuple, kwargs: dict) -> None:
            a = {**dict(zip(_MHA_ARGS, args)), **kwargs}
            q_in, k_in, v_in = a.get("query"), a.get("key"), a.get("value")
            if (k_in is not None and k_in is not q_in) or (v_in is not None and v_in is not q_in):
                raise TapError(f"block {l}'s attention is not self-attention (its key input is not its query input)")
            if a.get("attn_mask") is not None or a.get("key_padding_mask") is not None or a.get("is_causal"):
                raise TapError(f"block {l} ran with an attention mask; taps record unmasked self-attention only")
            x = q_in.detach()
            if not mha.batch_first:
                x = x.transpose(0, 1)
            wq, bq, wk, bk = (t.detach() if t is not None else None for t in projections())
            if want & CLS_SIGNALS:
                logits, probs = cls_attention_from_input(x, wq, bq, wk, bk, H, scale)
                tap.record_logits(l, want, logits, probs)
            if "keys" in want:
                tap.record_keys(l, head_mean_keys_from_input(x[:, tap.num_prefix_tokens:], wk, bk, H))
            rest = want & CLS_FREE_SIGNALS
            if rest:
                B, N = x.shape[:2]
                k = F.linear(x, wk, bk).view(B, N, H, D // H).transpose(1, 2)
                q = F.linear(x, wq, bq).view(B, N, H, D // H).transpose(1, 2) if "attn_received" in rest else None
                tap.record_qk(l, rest, None, k, scale, q=q)

        return [mha.register_forward_pre_hook(before_attention, with_kwargs=True)]
