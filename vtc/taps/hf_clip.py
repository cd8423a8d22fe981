"""Tap adapter for Hugging Face CLIP and SigLIP vision towers (``CLIPVisionModel``, ``SiglipVisionModel``).

Accepts the vision model itself (in LLaVA: ``model.model.vision_tower``), or anything holding it
as ``vision_model`` (``CLIPModel``, ``CLIPVisionModelWithProjection``, older transformers'
``CLIPVisionModel`` wrapping a ``CLIPVisionTransformer``). Layer ``l`` is ``encoder.layers[l]``.

Forward hooks on ``self_attn.q_proj`` and ``self_attn.k_proj`` capture the projections the
attention computes anyway. They are *unscaled*: HF applies ``self_attn.scale`` inside the attention
function, so the CLS row is ``q_cls·k · scale``. A forward hook on ``self_attn`` (which fires after
both projections, whatever the attention implementation: eager, SDPA, FlashAttention) computes the
signals and drops the captured tensors. Only the CLS row of q is kept unless ``attn_received`` is
asked for, which needs every query row. CLIP has a CLS token first; SigLIP has none, so every token
is a patch token and CLS signals are refused (``attn_received`` / ``key_norms`` are its CLS-free ones).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vtc.errors import TapError, UnsupportedModelError
from vtc.taps.tap import CLS_SIGNALS, Tap, TowerAdapter

__all__ = ["HFVisionAdapter"]

#: Attention classes whose q_proj/k_proj outputs are the plain (unnormalised, un-rotated) q and k.
_ATTENTIONS = {
    "CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2",
    "SiglipAttention", "SiglipSdpaAttention", "SiglipFlashAttention2",
}


def _vision_root(tower: nn.Module) -> nn.Module:
    root = tower
    while not hasattr(root, "encoder") and isinstance(getattr(root, "vision_model", None), nn.Module):
        root = root.vision_model
    layers = getattr(getattr(root, "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(root, "embeddings"):
        inner = getattr(tower, "model", None)
        hint = ""
        if hasattr(tower, "vision_tower") or hasattr(inner, "vision_tower"):
            hint = " (for a LLaVA model pass model.model.vision_tower)"
        elif hasattr(tower, "visual") or hasattr(inner, "visual"):
            hint = " (for a Qwen VL model pass model.model.visual)"
        raise UnsupportedModelError(
            f"{type(tower).__name__} is not a Hugging Face CLIP/SigLIP vision tower: it has no "
            f"embeddings + encoder.layers{hint}"
        )
    return root


class HFVisionAdapter(TowerAdapter):
    """Hooks for ``CLIPVisionModel`` / ``SiglipVisionModel`` (see the module docstring)."""

    def __init__(self, tower: nn.Module) -> None:
        root = _vision_root(tower)
        self.layers = root.encoder.layers
        kinds = {type(getattr(layer, "self_attn", None)).__name__ for layer in self.layers}
        bad = kinds - _ATTENTIONS
        if bad:
            raise UnsupportedModelError(
                f"vtc taps support Hugging Face CLIP and SigLIP attention ({', '.join(sorted(_ATTENTIONS))}); "
                f"{type(tower).__name__} uses {', '.join(sorted(bad))}"
            )
        emb = root.embeddings
        self.has_cls = hasattr(emb, "class_embedding")
        self.num_prefix_tokens = 1 if self.has_cls else 0
        self.family = "Hugging Face " + ("CLIP" if self.has_cls else "SigLIP")
        self.num_layers = len(self.layers)
        size, patch = getattr(emb, "image_size", None), getattr(emb, "patch_size", None)
        if isinstance(size, int) and isinstance(patch, int) and patch > 0:
            self.grid = (size // patch, size // patch)

    def layer(self, l: int) -> nn.Module:
        return self.layers[l]

    def hook_attention(self, l: int, want: frozenset[str], tap: Tap) -> list[RemovableHandle]:
        attn = self.layers[l].self_attn
        H, d, scale = attn.num_heads, attn.head_dim, attn.scale
        all_rows = "attn_received" in want
        need_q = all_rows or bool(want & CLS_SIGNALS)
        seen: dict[str, Tensor] = {}

        def on_q(module: nn.Module, args: tuple, out: Tensor) -> None:
            seen["q"] = out if all_rows else out[:, 0]

        def on_k(module: nn.Module, args: tuple, out: Tensor) -> None:
            seen["k"] = out

        def on_attention(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            k = seen.pop("k", None)
            q = seen.pop("q", None)
            if mask is not None:
                raise TapError(
                    f"layer {l} of this {self.family} tower ran with an attention mask; taps record "
                    "unmasked vision self-attention only"
                )
            if k is None or (need_q and q is None):
                raise TapError(f"layer {l}'s q_proj/k_proj did not run inside its self_attn; cannot tap it")
            B, N = k.shape[:2]
            k = k.view(B, N, H, d).transpose(1, 2)
            q_all = q.view(B, N, H, d).transpose(1, 2) if all_rows else None
            q_cls = None if not need_q else (q_all[:, :, 0] if all_rows else q.view(B, H, d))
            tap.record_qk(l, want, q_cls, k, scale, q=q_all)

        handles = [attn.k_proj.register_forward_hook(on_k)]
        if need_q:
            handles.append(attn.q_proj.register_forward_hook(on_q))
        handles.append(attn.register_forward_hook(on_attention, with_kwargs=True))
        return handles
