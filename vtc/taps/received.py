"""CLS-free per-token signals from captured queries and keys: attention received, key norms.

:func:`received_attention` sums, for every key token, the post-softmax attention it receives from
a set of query rows, averaged over heads: ``sum_i mean_h softmax(q_h,i · K_h · scale)[j]``. It
walks the query rows in chunks so that at most ``[B, H, chunk, N]`` scores exist at once (the
``N x N`` map is never materialised); the chunk is sized by an element budget
(:data:`MAX_CHUNK_ELEMENTS`). Dividing by the number of query rows gives the column mean HiPrune
scores tokens by ("HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in
Vision Encoders", 2025: column mean of the softmax map over all query rows and heads).
:func:`received_attention_packed` does the same for packed sequences (Qwen VL vision towers), each
``cu_seqlens`` segment attending only to itself, with segments of equal length batched together.

:func:`key_norms` is the mean over heads of each head's key L2 norm. Norm-then-mean, not the norm
of the head-mean key: the key-norm literature scores each key in its own head ("A Simple and
Effective L2 Norm-Based Strategy for KV Cache Compression", Devoto et al., 2024: a low key norm
predicts high attention), and the heads' key spaces are unrelated, so averaging keys across heads
before the norm lets them cancel. A rotary embedding rotates each head's key in place, so this
signal is the same before and after RoPE. (The norm of the head-mean key is
``tokens.signal("keys", l).norm(dim=-1)`` where ``keys`` is recorded.)

Everything is computed in float32 from the tensors the tower already produced.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MAX_CHUNK_ELEMENTS", "chunk_rows", "received_attention", "received_attention_packed", "key_norms"]

#: Default bound on the score elements one chunk holds (``B * H * rows * N``): 2**24 float32 = 64 MiB.
MAX_CHUNK_ELEMENTS = 1 << 24


def chunk_rows(batch_heads: int, num_rows: int, num_keys: int, max_elements: int | None = None) -> int:
    """Query rows per chunk so that ``batch_heads * rows * num_keys <= max_elements`` (at least one row)."""
    budget = MAX_CHUNK_ELEMENTS if max_elements is None else int(max_elements)
    return max(1, min(num_rows, budget // max(1, batch_heads * num_keys)))


def received_attention(q: Tensor, k: Tensor, scale: float, max_elements: int | None = None) -> Tensor:
    """``[B, N]`` float32: attention each key receives, summed over the query rows of ``q``, head-mean.

    ``q [B, H, Nq, d]`` and ``k [B, H, N, d]`` are the queries and keys as the attention uses them
    (after any normalisation or rotary embedding), unscaled; ``scale`` is the attention's scale.
    Every query row's softmax runs over all ``N`` keys. Divide by ``Nq`` for the column mean.
    Rows are processed ``chunk_rows(B*H, Nq, N, max_elements)`` at a time.
    """
    B, H, Nq, d = q.shape
    N = k.shape[2]
    kt = k.float().transpose(-1, -2)  # [B, H, d, N]
    out = torch.zeros(B, N, dtype=torch.float32, device=k.device)
    c = chunk_rows(B * H, Nq, N, max_elements)
    for s in range(0, Nq, c):
        scores = torch.matmul(q[:, :, s:s + c].float() * scale, kt)  # [B, H, c, N]
        out += torch.softmax(scores, dim=-1).sum((1, 2))
    return out.div_(H)


def received_attention_packed(q: Tensor, k: Tensor, cu_seqlens: Tensor, scale: float,
                              max_elements: int | None = None) -> Tensor:
    """``[S]`` float32: attention each token of a packed sequence receives within its own segment.

    ``q, k [S, H, d]`` (a Qwen VL vision attention's layout) hold segments ``cu_seqlens[i] ..
    cu_seqlens[i+1]`` that attend only to themselves (images, video frames or windows). Token ``j``
    gets the sum over its segment's query rows of the head-mean softmax probability on ``j``
    (divide by the row count wanted for a mean). Segments of equal length run as one batch.
    """
    S = q.shape[0]
    cu = cu_seqlens.tolist()
    starts = torch.tensor(cu[:-1], dtype=torch.long)
    lengths = torch.tensor(cu[1:], dtype=torch.long) - starts
    out = torch.zeros(S, dtype=torch.float32, device=k.device)
    for n in sorted(set(lengths.tolist())):
        if n == 0:
            continue
        seg = starts[lengths == n]
        pos = (seg.unsqueeze(1) + torch.arange(n)).to(q.device)  # [W, n]: the tokens of each segment
        qs = q[pos].permute(0, 2, 1, 3)  # [W, H, n, d]
        ks = k[pos].permute(0, 2, 1, 3)
        out[pos.reshape(-1)] = received_attention(qs, ks, scale, max_elements).reshape(-1)
    return out


def key_norms(k: Tensor) -> Tensor:
    """Mean over heads of each head's key L2 norm, float32: ``k [B, H, N, d]`` gives ``[B, N]``,
    a packed ``[S, H, d]`` gives ``[S]`` (heads on dimension 1 in both)."""
    return torch.linalg.vector_norm(k.float(), dim=-1).mean(1)
