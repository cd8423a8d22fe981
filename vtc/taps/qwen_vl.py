"""Tap adapter for the Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers (transformers 5.x), and the 2x2 merger.

Towers: ``Qwen2VisionTransformerPretrainedModel``, ``Qwen2_5_VisionTransformerPretrainedModel``,
``Qwen3VLVisionModel`` (and ``Qwen3VLMoeVisionModel``), i.e. ``model.model.visual`` of the VLM.
They run on one *packed* sequence: ``forward(pixel_values, grid_thw)`` embeds the ``S = sum t*h*w``
patches of every image (video) in the call as one ``[S, D]`` tensor, and each attention attends
within the segments of ``cu_seqlens`` only: one segment per image frame, and, in Qwen2.5-VL's
window layers (all but ``fullatt_block_indexes``), one per window of ``window_size`` pixels. Qwen2.5-VL
also reorders the patches window by window before its blocks (``get_vision_window_index``) and
undoes that only after its merger.

Hooks (no forward body is copied):

- a forward pre-hook on the tower reads ``grid_thw`` (the per-image token counts) and, for
  Qwen2.5-VL, the window order, from transformers' own ``get_vision_window_index`` (or the
  precomputed ``window_index`` the caller passed);
- per requested layer ``l``: a pre-hook on ``blocks[l].attn`` reads the ``cu_seqlens`` and the
  rotary ``position_embeddings`` the block attends with, a hook on ``attn.qkv`` the fused
  projection, and a hook on ``attn`` then applies the tower module's own
  ``apply_rotary_pos_emb_vision`` to q and k: exactly the q and k the tower's attention uses,
  whatever its implementation (SDPA, FlashAttention varlen, eager).

Signals (no CLS token here: ``cls_attn`` / ``cls_logits`` are refused), each a tensor over the whole
packed sequence in the tower's *input* order (the order of ``pixel_values`` rows, also for
Qwen2.5-VL), on the pre-merger patches, i.e. taken inside the blocks before the 2x2 patch merger:

- ``attn_received[l]`` ``[S]`` float32: for token ``j`` of an image frame with ``n = h*w`` patches,
  ``(1/n) * sum_i mean_h A_h[i, j]`` over the frame's query rows ``i``, where ``A`` is the
  attention the layer really computes: the full frame in full-attention layers (the column mean),
  only ``j``'s window in Qwen2.5-VL's window layers (rows outside the window give 0). Chunked over
  query rows, per segment; segments of equal length run as one batch;
- ``key_norms[l]`` ``[S]`` float32: mean over heads of each head's key norm (RoPE leaves it unchanged);
- ``keys[l]`` ``[S, d]``: head-mean keys after RoPE (as the attention uses them), tower dtype;
- ``hidden[l]`` ``[S, D]``: the output of ``blocks[l]``.

:meth:`vtc.taps.Tap.per_image` splits them into each image's ``t*h*w`` patches, and
:func:`to_merged_grid` aggregates a per-patch signal to the merged tokens the LLM receives. The
processor lays each image's patches out merge group by merge group (every ``m*m`` consecutive
patches are one merged token, merged tokens in raster order of the ``h/m x w/m`` grid, frame by
frame), which is the order the merger concatenates them in; so the aggregation is a reduction over
consecutive groups of ``m*m`` (``m = spatial_merge_size``, 2). The feature layer of these towers is
their last layer (the merger reads it); Qwen3-VL's deepstack mergers read earlier layers as well.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vtc.errors import InputError, TapError, UnsupportedModelError
from vtc.taps.received import key_norms, received_attention_packed
from vtc.taps.tap import Tap, TowerAdapter

__all__ = ["QwenVisionAdapter", "to_merged_grid"]

_FAMILIES = {
    "Qwen2VisionTransformerPretrainedModel": "Qwen2-VL vision tower",
    "Qwen2_5_VisionTransformerPretrainedModel": "Qwen2.5-VL vision tower",
    "Qwen3VLVisionModel": "Qwen3-VL vision tower",
    "Qwen3VLMoeVisionModel": "Qwen3-VL-MoE vision tower",
}
_REDUCE = ("mean", "sum", "max")


def to_merged_grid(signal: Tensor, merge_size: int = 2, reduce: str = "mean") -> Tensor:
    """A per-patch signal ``[n, ...]`` aggregated to the merged tokens ``[n / merge_size**2, ...]``.

    ``signal`` is in a Qwen VL tower's token order (one image from :meth:`vtc.taps.Tap.per_image`,
    or a whole packed sequence: groups never straddle images), where each run of ``merge_size**2``
    consecutive patches is one merged token. ``reduce``: ``"mean"`` (default; for ``attn_received``
    the sum is the same ranking times 4), ``"sum"`` (attention mass of the merged token) or ``"max"``.
    The result is in the merger's output order: raster order of each frame's merged grid.
    """
    if reduce not in _REDUCE:
        raise InputError(f"to_merged_grid reduce= must be one of {', '.join(_REDUCE)}, got {reduce!r}")
    g = int(merge_size) ** 2
    if not isinstance(signal, Tensor) or signal.dim() < 1 or signal.shape[0] % g:
        shape = tuple(signal.shape) if isinstance(signal, Tensor) else type(signal).__name__
        raise InputError(
            f"to_merged_grid needs a per-patch signal whose length is a multiple of {g} (merge_size={merge_size}), "
            f"got {shape}; pass one image's pre-merger signal from Tap.per_image"
        )
    groups = signal.reshape(signal.shape[0] // g, g, *signal.shape[1:])
    if reduce == "max":
        return groups.amax(1)
    return groups.sum(1) if reduce == "sum" else groups.mean(1)


def _arg(args: tuple, kwargs: dict, i: int, name: str) -> Any:
    return kwargs[name] if name in kwargs else (args[i] if len(args) > i else None)


class QwenVisionAdapter(TowerAdapter):
    """Hooks for the Qwen VL vision towers (see the module docstring)."""

    packed = True
    seq_dim = 0

    def __init__(self, tower: nn.Module) -> None:
        blocks = getattr(tower, "blocks", None)
        name = type(tower).__name__
        if name not in _FAMILIES or not isinstance(blocks, nn.ModuleList) or not len(blocks):
            raise UnsupportedModelError(f"{name} is not a Qwen VL vision tower with blocks")
        for i, b in enumerate(blocks):
            attn = getattr(b, "attn", None)
            if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "scaling")):
                raise UnsupportedModelError(f"blocks[{i}] of this {name} has no attn.qkv / num_heads / scaling to tap")
        rope = getattr(sys.modules.get(type(blocks[0].attn).__module__), "apply_rotary_pos_emb_vision", None)
        if not callable(rope):
            raise UnsupportedModelError(f"{type(blocks[0].attn).__module__} has no apply_rotary_pos_emb_vision; "
                                        "this transformers version's Qwen VL tower is not supported by vtc taps")
        self.tower = tower
        self.blocks = blocks
        self.rope = rope
        self.family = _FAMILIES[name]
        self.num_layers = len(blocks)
        self.feature_layer = self.num_layers - 1  # the merger reads the last block's output
        self.merge_size = int(tower.spatial_merge_size)
        self.windowed = hasattr(tower, "fullatt_block_indexes")
        # per forward: token order inside the blocks -> tower order, and each token's frame length
        self._inverse: Tensor | None = None
        self._frame_len: Tensor | None = None

    def layer(self, l: int) -> nn.Module:
        return self.blocks[l]

    # ------------------------------------------------------------------ per forward
    def hook_tower(self, tap: Tap) -> list[RemovableHandle]:
        def before_tower(module: nn.Module, args: tuple, kwargs: dict) -> None:
            grid = _arg(args, kwargs, 1, "grid_thw")
            if not isinstance(grid, Tensor) or grid.dim() != 2 or grid.shape[1] != 3:
                raise TapError(f"this {self.family} was called without grid_thw [num_images, 3]; cannot tap it")
            g = grid.detach().long().cpu()
            t, hw = g[:, 0], g[:, 1] * g[:, 2]
            tap.image_token_counts = (t * hw).tolist()
            self._frame_len = torch.repeat_interleave(hw.repeat_interleave(t), hw.repeat_interleave(t))
            self._inverse = None
            if self.windowed:
                self._inverse = self._window_inverse(grid, kwargs)

        return [self.tower.register_forward_pre_hook(before_tower, with_kwargs=True)]

    def _window_inverse(self, grid: Tensor, kwargs: dict) -> Tensor:
        """Positions, in the blocks' window order, of the tower-order tokens (``x_tower = x_blocks[inv]``)."""
        window_index = kwargs.get("window_index")
        if window_index is None or kwargs.get("cu_window_seqlens") is None:
            try:
                from transformers.vision_utils import get_vision_window_index
            except ImportError as e:  # pragma: no cover - depends on the transformers version
                raise UnsupportedModelError(f"this transformers has no vision_utils.get_vision_window_index ({e}); "
                                            "vtc taps need transformers 5.x for Qwen2.5-VL") from e
            t = self.tower
            window_index, _ = get_vision_window_index(grid, spatial_merge_size=t.spatial_merge_size,
                                                      window_size=t.window_size, patch_size=t.patch_size)
        unit = self.merge_size ** 2
        order = (window_index.long().cpu().unsqueeze(1) * unit + torch.arange(unit)).reshape(-1)
        return torch.argsort(order)  # order[p] is the tower-order token at block position p

    def to_tower_order(self, x: Tensor) -> Tensor:
        """A per-token tensor ``[S, ...]`` in the blocks' order, in the tower's input order."""
        if self._inverse is None:
            return x
        if self._inverse.device != x.device:
            self._inverse = self._inverse.to(x.device)
        return x[self._inverse]

    def hidden(self, out: Any, tap: Tap) -> Tensor:
        x = out[0] if isinstance(out, (tuple, list)) else out
        return self.to_tower_order(x)

    # ------------------------------------------------------------------ attention
    def hook_attention(self, l: int, want: frozenset[str], tap: Tap) -> list[RemovableHandle]:
        attn = self.blocks[l].attn
        H, scale = int(attn.num_heads), float(attn.scaling)
        seen: dict[str, Any] = {}

        def before_attention(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen["cu"] = _arg(args, kwargs, 1, "cu_seqlens")
            seen["pos"] = _arg(args, kwargs, 2, "position_embeddings")

        def on_qkv(module: nn.Module, args: tuple, out: Tensor) -> None:
            seen["qkv"] = out

        def after_attention(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            qkv, cu, pos = seen.pop("qkv", None), seen.pop("cu", None), seen.pop("pos", None)
            if qkv is None or cu is None or pos is None:
                raise TapError(f"layer {l} of this {self.family} ran without qkv / cu_seqlens / position_embeddings "
                               "where the tap expects them; cannot tap it")
            S = qkv.shape[0]
            if self._frame_len is None or int(self._frame_len.numel()) != S:
                raise TapError(f"layer {l} of this {self.family} saw {S} tokens but grid_thw describes "
                               f"{None if self._frame_len is None else int(self._frame_len.numel())}")
            q, k = qkv.detach().reshape(S, 3, H, -1).unbind(1)[:2]
            cos, sin = pos
            q, k = self.rope(q, k, cos.detach(), sin.detach())
            if "attn_received" in want:
                sums = received_attention_packed(q, k, cu, scale, tap.max_chunk_elements)
                frame = self._frame_len.to(device=sums.device, dtype=sums.dtype)
                tap.record("attn_received", l, self.to_tower_order(sums) / frame)
            if "key_norms" in want:
                tap.record("key_norms", l, self.to_tower_order(key_norms(k)))
            if "keys" in want:
                tap.record("keys", l, self.to_tower_order(k.mean(1)))

        return [
            attn.register_forward_pre_hook(before_attention, with_kwargs=True),
            attn.qkv.register_forward_hook(on_qkv),
            attn.register_forward_hook(after_attention, with_kwargs=True),
        ]
