"""Tap adapter for timm ``VisionTransformer`` towers, the ``vit_*_clip_*`` models included.

Layer ``l`` is ``blocks[l]``, the same numbering as Hugging Face's ``encoder.layers[l]`` (timm's
``norm_pre`` plays HF CLIP's ``pre_layrnorm``; neither counts as a layer). The prefix tokens are the
CLS token (when ``class_token=True``) followed by any register tokens; patch tokens follow.

timm's ``Attention`` projects q, k and v with one fused ``qkv`` Linear, then applies ``q_norm`` and
``k_norm`` (identities unless ``qk_norm=True``) and hands the *unscaled* q, k to SDPA (or scales q
itself when ``fused_attn`` is off). Forward hooks on ``q_norm`` and ``k_norm`` therefore capture
exactly the q and k the attention uses, normalised, ``[B, H, N, d]`` (only the CLS row of q is
kept unless ``attn_received`` needs every row); a forward hook on the attention module computes
the signals once both exist.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vtc.errors import TapError, UnsupportedModelError
from vtc.taps.tap import CLS_SIGNALS, Tap, TowerAdapter

__all__ = ["TimmVitAdapter"]


class TimmVitAdapter(TowerAdapter):
    """Hooks for ``timm.models.vision_transformer.VisionTransformer`` (see the module docstring)."""

    def __init__(self, tower: nn.Module) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(tower, VisionTransformer):
            raise UnsupportedModelError(
                f"vtc taps support timm's VisionTransformer (vit_*), not {type(tower).__name__}"
            )
        bad = {type(getattr(b, "attn", None)).__name__ for b in tower.blocks if type(getattr(b, "attn", None)) is not Attention}
        if bad:
            raise UnsupportedModelError(
                f"vtc taps support timm VisionTransformer blocks with timm.layers.Attention; this model's blocks use "
                f"{', '.join(sorted(bad))}"
            )
        self.blocks = tower.blocks
        self.family = "timm VisionTransformer"
        self.num_layers = len(tower.blocks)
        self.has_cls = bool(getattr(tower, "has_class_token", getattr(tower, "cls_token", None) is not None))
        self.num_prefix_tokens = int(tower.num_prefix_tokens)
        grid = getattr(getattr(tower, "patch_embed", None), "grid_size", None)
        if grid is not None and len(grid) == 2:
            self.grid = (int(grid[0]), int(grid[1]))

    def layer(self, l: int) -> nn.Module:
        return self.blocks[l]

    def hook_attention(self, l: int, want: frozenset[str], tap: Tap) -> list[RemovableHandle]:
        attn = self.blocks[l].attn
        all_rows = "attn_received" in want
        need_q = all_rows or bool(want & CLS_SIGNALS)
        seen: dict[str, Tensor] = {}

        def on_q(module: nn.Module, args: tuple, out: Tensor) -> None:
            seen["q"] = out if all_rows else out[:, :, 0]

        def on_k(module: nn.Module, args: tuple, out: Tensor) -> None:
            seen["k"] = out

        def on_attention(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
            causal = kwargs.get("is_causal", args[2] if len(args) > 2 else False)
            k = seen.pop("k", None)
            q = seen.pop("q", None)
            if mask is not None or causal:
                raise TapError(
                    f"block {l} of this timm VisionTransformer ran with an attention mask; taps record unmasked "
                    "self-attention only"
                )
            if k is None or (need_q and q is None):
                raise TapError(f"block {l}'s q_norm/k_norm did not run inside its attention; cannot tap it")
            q_cls = None if not need_q else (q[:, :, 0] if all_rows else q)
            tap.record_qk(l, want, q_cls, k, attn.scale, q=q if all_rows else None)

        handles = [attn.k_norm.register_forward_hook(on_k)]
        if need_q:
            handles.append(attn.q_norm.register_forward_hook(on_q))
        handles.append(attn.register_forward_hook(on_attention, with_kwargs=True))
        return handles
