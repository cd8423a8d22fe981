"""Selection primitives shared by the operators: ranked top-k with variable k per image.

Ties are broken by position (the earlier token wins), matching ``torch.argmax`` in the official
code, so selections are exact and reproducible. Everything is batched: one sort per call.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from vtc.tokens import VisualTokens


def descending_order(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """Positions ``[B, N]`` sorted by descending score; ties keep position order; invalid last."""
    s = scores
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    s = torch.nan_to_num(s, nan=float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    if valid is not None:
        # -inf scores of real tokens must still rank above padding: sort padding to the end
        pad_last = torch.sort((~valid).gather(1, order).to(torch.uint8), dim=1, stable=True).indices
        order = order.gather(1, pad_last)
    return order


def first_k(order: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """The first ``k[b]`` entries of each row of ``order``: ``(idx [B, K], valid [B, K])``."""
    K = int(k.max().item()) if k.numel() else 0
    idx = order[:, :K]
    valid = torch.arange(K, device=order.device).unsqueeze(0) < k.unsqueeze(1)
    return idx, valid


def mask_from_order(order: Tensor, k: Tensor, n: int | None = None) -> Tensor:
    """``[B, n]`` bool: true at the first ``k[b]`` positions listed in ``order`` (n defaults to its width)."""
    idx, valid = first_k(order, k)
    n = order.shape[1] if n is None else n
    # entries past k[b] go to a spare column: they may repeat a kept position (DivPrune repeats its
    # last pick), and a scatter with duplicate indices keeps an arbitrary one of the written values
    m = torch.zeros(order.shape[0], n + 1, dtype=torch.bool, device=order.device)
    m.scatter_(1, torch.where(valid, idx, torch.full_like(idx, n)), True)
    return m[:, :n]


def descending_positions(scores: Tensor, k: int, *, stable: bool = True) -> Tensor:
    """``[B, k]``: the positions of each row's ``k`` highest scores, by descending score (no padding,
    no NaN). ``stable``: ties go to the lower position; ``stable=False`` is ``torch.argsort(...,
    descending=True)``'s own order (what official code that calls it gets on the same device)."""
    return torch.sort(scores, dim=1, descending=True, stable=stable).indices[:, :k]


def rank_mask(order: Tensor, k: Tensor) -> Tensor:
    """``[B, N]`` bool: true at the first ``k[b]`` positions listed in ``order`` (a permutation of
    ``0..N-1`` per row). Unlike :func:`mask_from_order` it needs no host sync."""
    B, N = order.shape
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(B, N))
    return rank < k.view(B, 1)


def keep_top(tokens: VisualTokens, scores: Tensor, k: Tensor | int,
             order: Literal["original", "score"] = "original", *, stable: bool = True) -> VisualTokens:
    """Keep the ``k[b]`` highest-scoring tokens of each image.

    ``order="original"`` keeps them in their current (raster) order; ``"score"`` emits them by
    descending score. An ``int`` ``k`` (every image holds all its tokens: no mask) runs without a
    host sync; ``stable`` as in :func:`descending_positions` (int ``k`` only).
    """
    if isinstance(k, int):
        idx = descending_positions(scores, k, stable=stable)
        return tokens.gather(idx if order == "score" else idx.sort(dim=1).values)
    ranked = descending_order(scores, tokens.mask)
    if order == "score":
        return tokens.gather(*first_k(ranked, k))
    return tokens.keep_mask(mask_from_order(ranked, k))
