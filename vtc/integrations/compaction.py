"""Compaction: shrink each image's run of placeholder tokens to the tokens its pipeline kept.

The processor expands every ``<image>`` into as many placeholder tokens as the stock model emits
for that image. After compression image ``i`` has ``k_i`` tokens, so its run keeps its first
``k_i`` placeholders and loses the rest; every other token stays. :func:`plan` works out which
positions survive for a whole batch at once (images are matched to runs in (row, position) order,
as Hugging Face's ``masked_scatter`` fills them), and the returned :class:`Compaction` rebuilds
``input_ids``, ``attention_mask``, ``position_ids`` and ``labels`` for the shorter sequences,
re-padded on the side the batch was padded on (left for generation).

Position ids: ``"contiguous"`` subtracts from every surviving token the number of placeholders
dropped before it (no gaps; for Hugging Face's default positions this is a plain renumbering);
``"original"`` keeps the original ids. :class:`DecodeState` carries what decoding steps need to
stay consistent with the compacted cache: the compacted prompt mask and, per row, how many tokens
were dropped, so masks over the original length are mapped onto the cache and new positions
continue either from the compacted length or from the original one.

A plan costs one host synchronisation: every value the host needs (the compacted length, the checks
of the placeholder count and of each image's run, how many tokens each image kept) comes back in
one transfer; everything else stays on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vtc.errors import InputError

__all__ = ["Compaction", "DecodeState", "plan"]


@dataclass
class Compaction:
    """Which positions of a ``[B, L]`` batch survive and where they go (see the module docstring)."""

    keep: Tensor  # [B, L] bool, positions that survive
    src: Tensor  # [B, Lc] long, original position of each compacted slot (0 for padding)
    slot_valid: Tensor  # [B, Lc] bool, slots holding a surviving token
    dropped_before: Tensor  # [B, L] long, placeholders dropped strictly before each position
    dropped: Tensor  # [B] long, placeholders dropped per row
    new_padding: bool  # some rows needed padding that was not there before
    image: Tensor | None = None  # [B, L] long, the image whose run holds each placeholder (-1: not one)
    offset: Tensor | None = None  # [B, L] long, each placeholder's place in its image's run
    changed: bool = True  # some placeholder was dropped (the prompt is shorter for some row)
    kept: list[int] | None = None  # tokens each image kept (on the host)

    @property
    def length(self) -> int:
        return self.src.shape[1]

    def _take(self, t: Tensor, fill: int | float | bool) -> Tensor:
        if not self.changed:
            return t
        idx = self.src if t.dim() == 2 else self.src.view(*self.src.shape, *([1] * (t.dim() - 2))).expand(
            *self.src.shape, *t.shape[2:])
        g = t.gather(1, idx)
        if not self.new_padding:  # every slot holds a token
            return g
        shape = (*self.slot_valid.shape, *([1] * (t.dim() - 2)))
        return torch.where(self.slot_valid.view(shape), g, torch.full_like(g, fill))

    def ids(self, input_ids: Tensor, pad_id: int) -> Tensor:
        return self._take(input_ids, pad_id)

    def attention_mask(self, attention_mask: Tensor | None) -> Tensor | None:
        if attention_mask is None:
            return self.slot_valid.long() if self.new_padding else None
        return self._take(attention_mask, 0)

    def labels(self, labels: Tensor | None) -> Tensor | None:
        return None if labels is None else self._take(labels, -100)

    def visual_index(self, index: Tensor) -> Tensor:
        """``[B, Lc]`` long: the index (``index[i, j]``: the original token index the compressed
        tokens carry, one row per image) of the visual token each slot holds, -1 for text and padding.
        What the ``llm_layer`` stage's ``LayerContext.index`` is at the first decoder layer."""
        img = self.image.gather(1, self.src)
        off = self.offset.gather(1, self.src)
        visual = (img >= 0) & self.slot_valid
        tok = index.to(img.device)[img.clamp_min(0), off.clamp_min(0).clamp_max(index.shape[1] - 1)]
        return torch.where(visual, tok, torch.full_like(tok, -1))

    def token_source(self, index: Tensor) -> Tensor:
        """``[B, Lc]``: the original prompt position of the token each slot carries.

        A text slot carries its own token; the ``j``-th kept token of image ``i`` (``index[i, j]``:
        its position in the image's stock token sequence, e.g. its raster position in the merged
        grid for Qwen VL) stands where stock put it, at its run's start plus ``index[i, j]``.
        Padding slots get 0.
        """
        tok = self.visual_index(index)
        off = self.offset.gather(1, self.src)
        out = torch.where(tok >= 0, self.src - off + tok, self.src)
        return torch.where(self.slot_valid, out, torch.zeros_like(out))

    def position_ids(self, position_ids: Tensor | None, mode: str) -> Tensor:
        """Positions of the compacted slots; Hugging Face's default (``arange(L)``) when none are given."""
        B, L = self.keep.shape
        if position_ids is None:
            pos = torch.arange(L, device=self.keep.device).expand(B, L)
        else:
            if position_ids.dim() != 2 or position_ids.shape[-1] != L:
                raise InputError(
                    f"position_ids must be [batch, {L}] to be compacted with the sequence, got {tuple(position_ids.shape)}"
                )
            pos = position_ids.expand(B, L)
        if mode == "contiguous":
            pos = pos - self.dropped_before.to(pos.dtype)
        return self._take(pos, 0)


def _on(values: Sequence[int], dev: torch.device) -> Tensor:
    """A long tensor of host ``values`` on ``dev`` without a blocking host-to-device copy."""
    if values and all(v == values[0] for v in values):
        return torch.full((len(values),), values[0], dtype=torch.long, device=dev)
    t = torch.tensor(list(values), dtype=torch.long)
    return t if dev.type == "cpu" else t.to(dev, non_blocking=True)


def plan(input_ids: Tensor, attention_mask: Tensor | None, image_token_id: int,
         stock_lengths: Sequence[int], kept: Tensor | Sequence[int]) -> Compaction:
    """Plan the compaction of ``input_ids`` for images of ``stock_lengths`` placeholders keeping ``kept``
    tokens (a device tensor, or host ints when they are known without looking at the data)."""
    if input_ids is None:
        raise InputError("vtc needs input_ids (with the processor's image placeholder tokens) to compact the prompt")
    B, L = input_ids.shape
    dev = input_ids.device
    n_img = len(stock_lengths)
    stock_host = [int(v) for v in stock_lengths]
    kept_host = None if isinstance(kept, Tensor) else [int(v) for v in kept]
    ph = input_ids == image_token_id
    stock = _on(stock_host, dev)
    kept_t = kept.to(dev).long() if kept_host is None else _on(kept_host, dev)
    flat = ph.reshape(-1)
    rank = torch.cumsum(flat.long(), 0) - 1  # placeholder rank in (row, position) order
    ends = torch.cumsum(stock, 0)
    img = torch.searchsorted(ends, rank.clamp_min(0), right=True).clamp_max(max(n_img - 1, 0))
    offset = rank - (ends - stock)[img]
    keep_ph = flat & (offset < kept_t[img])
    # every image's run must sit in one row
    rows = torch.arange(B * L, device=dev) // L
    first = torch.full((n_img,), B, dtype=torch.long, device=dev).scatter_reduce(
        0, img, torch.where(flat, rows, B), reduce="amin", include_self=True)
    last = torch.full((n_img,), -1, dtype=torch.long, device=dev).scatter_reduce(
        0, img, torch.where(flat, rows, -1), reduce="amax", include_self=True)
    drop = (flat & ~keep_ph).view(B, L)
    keep = ~drop
    n_keep = keep.sum(1)
    pad_left = torch.ones((), dtype=torch.bool, device=dev) if attention_mask is None else (
        attention_mask[:, -1].bool().all())
    # the one host synchronisation: the checks, the compacted lengths, the kept counts
    head = torch.stack([flat.sum(), (first != last).any().long(), pad_left.long()])
    host = torch.cat([head, n_keep] + ([kept_t] if kept_host is None else [])).tolist()
    n_ph, split, pad_left_h = host[:3]
    n_keep_h = host[3:3 + B]
    kept_host = host[3 + B:] if kept_host is None else kept_host
    need = sum(stock_host)
    if n_ph != need:
        raise InputError(
            f"the prompt holds {n_ph} image placeholder tokens (id {image_token_id}) but the {n_img} "
            f"image(s) need {need} ({', '.join(map(str, stock_host))}); build input_ids and pixel_values together "
            "with the model's processor, which expands each <image> to the right count"
        )
    if any(k > s or k < 0 for k, s in zip(kept_host, stock_host)):
        raise InputError(
            f"an image kept {kept_host} tokens but has room for {stock_host} (the placeholders the processor "
            "put in input_ids); for LLaVA-NeXT, an unpad rounding other than transformers' can keep a row more than "
            "the processor counted when almost nothing is pruned: use vtc.apply(..., unpad_rounding='transformers')")
    if split:
        raise InputError("an image's placeholder tokens span two batch rows; each image's run must lie in one prompt")
    Lc = max(n_keep_h) if B else 0
    changed = any(k < s for k, s in zip(kept_host, stock_host))
    image = torch.where(flat, img, -1).view(B, L)
    offset = torch.where(flat, offset, -1).view(B, L)
    if not changed:  # every position survives where it is
        zero = torch.zeros(B, L, dtype=torch.long, device=dev)
        return Compaction(keep=keep, src=torch.arange(L, device=dev).expand(B, L), slot_valid=keep,
                          dropped_before=zero, dropped=zero[:, 0], new_padding=False, image=image, offset=offset,
                          changed=False, kept=kept_host)
    # kept positions, left-packed in order
    order = torch.sort(drop.to(torch.uint8), dim=1, stable=True).indices[:, :Lc]
    slot = torch.arange(Lc, device=dev).unsqueeze(0)
    if pad_left_h:
        shift = (Lc - n_keep).unsqueeze(1)
        j = slot - shift
        slot_valid = j >= 0
        src = order.gather(1, j.clamp_min(0))
    else:
        slot_valid = slot < n_keep.unsqueeze(1)
        src = order
    src = torch.where(slot_valid, src, torch.zeros_like(src))
    dropped_before = torch.cumsum(drop.long(), 1) - drop.long()
    return Compaction(keep=keep, src=src, slot_valid=slot_valid, dropped_before=dropped_before,
                      dropped=drop.sum(1), new_padding=any(n != Lc for n in n_keep_h), image=image, offset=offset,
                      changed=True, kept=kept_host)


@dataclass
class DecodeState:
    """What decoding steps after a compacted prefill need (kept per KV cache)."""

    prompt_length: int  # L: the prompt length the caller sees
    compact_length: int  # Lc: the prompt length in the cache
    prompt_mask: Tensor | None  # [B, Lc] compacted prompt mask (None: all ones)
    dropped: Tensor  # [B] tokens dropped per row
    mode: str  # "contiguous" or "original"
    next_position: Tensor | None = None  # [B] M-RoPE: the position id after the prompt's largest
    dropped_any: bool | None = None  # whether any row dropped a token (None: read ``dropped``, a host sync)

    def attention_mask(self, attention_mask: Tensor | None, cache_length: int, q: int) -> Tensor | None:
        """Map a mask over the caller's full length onto the cache's (compacted) length.

        A mask over the compacted sequence is taken as it is. When the two lengths coincide (a row
        that dropped nothing keeps the batch at its length while other rows gained padding), the
        prompt part is the compacted prompt mask in either reading.
        """
        L, Lc = self.prompt_length, self.compact_length
        new = cache_length - Lc  # tokens added after the prompt
        if attention_mask is None:
            if self.prompt_mask is None:
                return None
            B = self.prompt_mask.shape[0]
            ones = torch.ones(B, new + q, dtype=self.prompt_mask.dtype, device=self.prompt_mask.device)
            return torch.cat([self.prompt_mask, ones], 1)
        total = attention_mask.shape[1]
        if total == cache_length + q and L != Lc:  # already over the compacted sequence
            return attention_mask
        if total != L + new + q:
            raise InputError(
                f"attention_mask covers {total} tokens, but after compaction the cache holds {cache_length} "
                f"(a {L}-token prompt compacted to {Lc}) and {q} new token(s) came in; pass a mask over the "
                f"original sequence ({L + new + q}) or over the compacted one ({cache_length + q})"
            )
        prompt = self.prompt_mask if self.prompt_mask is not None else attention_mask.new_ones(attention_mask.shape[0], Lc)
        return torch.cat([prompt.to(attention_mask.dtype), attention_mask[:, L:]], 1)

    def position_ids(self, position_ids: Tensor | None, cache_length: int, q: int, device: torch.device) -> Tensor | None:
        """Positions of the new tokens: the caller's (or HF's default), shifted back in contiguous mode."""
        if position_ids is None:
            any_dropped = bool(self.dropped.any()) if self.dropped_any is None else self.dropped_any
            if self.mode == "contiguous" and not any_dropped:
                return None
            new = cache_length - self.compact_length
            position_ids = (torch.arange(q, device=device) + self.prompt_length + new).unsqueeze(0)
            position_ids = position_ids.expand(self.dropped.shape[0], q)
        if self.mode == "contiguous":
            return position_ids - self.dropped.to(position_ids.device, position_ids.dtype).unsqueeze(1)
        return position_ids
