"""The attention backend vtc's own modules call, and the CLS-row attention helpers the taps use.

:func:`attention` runs ``softmax(q kᵀ · scale + bias) v`` with xformers'
``memory_efficient_attention`` when xformers is installed *and* works for the inputs' device type
and dtype (and bias or not), else with ``torch.nn.functional.scaled_dot_product_attention``. Whether
xformers works is probed once per ``(device type, dtype, bias)`` with a tiny call checked against
SDPA, and cached; a missing or broken xformers build (ImportError or any other import-time error)
simply means SDPA. CPU always gets SDPA without importing xformers (xformers has no CPU kernels).
:func:`backend_name` says which backend runs for a device and dtype, so reports can print it.

The CLS-row helpers compute one row of an attention map, the CLS query against every key, in
``O(N)`` per head and never the ``N x N`` map: :func:`cls_attention` from queries and keys a tower
has already projected (Hugging Face CLIP/SigLIP, timm), and :func:`cls_attention_from_input` from
the attention block's input and its packed in-projection weights (``nn.MultiheadAttention`` in
open_clip), which folds the CLS query into the key projection so that the keys of all ``N``
tokens are never projected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vtc.errors import InputError

__all__ = [
    "attention",
    "backend_name",
    "last_backend",
    "cls_attention",
    "cls_attention_from_input",
    "head_mean_keys_from_input",
]

_BACKENDS: dict[tuple[str, torch.dtype, bool], str] = {}
_XOPS: object = None  # None: not tried yet; False: unavailable; else the xformers.ops module
_LAST: str | None = None


def _xformers_ops():
    """``xformers.ops``, or None when xformers is missing or fails to import against this torch."""
    global _XOPS
    if _XOPS is None:
        try:
            import xformers.ops as xops  # optional dependency, imported lazily

            _XOPS = xops if hasattr(xops, "memory_efficient_attention") else False
        except Exception:  # ImportError, or a wheel built for another torch/CUDA raising anything
            _XOPS = False
    return _XOPS or None


def _xformers_call(xops, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float | None) -> Tensor:
    # xformers takes [B, N, H, d]; vtc's layout (SDPA's) is [B, H, N, d]
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
    )
    return out.transpose(1, 2)


def _probe(device: torch.device, dtype: torch.dtype, with_bias: bool) -> str:
    xops = _xformers_ops()
    if xops is None:
        return "sdpa"
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, 2, 16, 64, generator=g).to(device=device, dtype=dtype) for _ in range(3))
        bias = _as_additive_bias(torch.randn(1, 2, 16, 16, generator=g).to(device), q) if with_bias else None
        got = _xformers_call(xops, q, k, v, bias, None).float()
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).float()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        return "xformers" if torch.allclose(got, want, atol=tol, rtol=tol) else "sdpa"
    except Exception:  # no kernel for this device/dtype, or a broken build
        return "sdpa"


def backend_name(device: torch.device | str | None = None, dtype: torch.dtype | None = None, bias: bool = False) -> str:
    """``"xformers"`` or ``"sdpa"``: the backend :func:`attention` uses for inputs on ``device`` of ``dtype``.

    ``device`` defaults to CUDA when available, else CPU; ``dtype`` to float16 on CUDA, else
    ``torch.get_default_dtype()``. Pass the real ones: the answer can differ per dtype.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.get_default_dtype()
    key = (device.type, dtype, bool(bias))
    if key not in _BACKENDS:
        _BACKENDS[key] = "sdpa" if device.type == "cpu" else _probe(device, dtype, bool(bias))
    return _BACKENDS[key]


def last_backend() -> str | None:
    """The backend the most recent :func:`attention` call ran on (None before the first call)."""
    return _LAST


def _as_additive_bias(bias: Tensor, q: Tensor) -> Tensor:
    """A bool mask (True = attend) or float bias as a float additive bias in ``q``'s dtype.

    The result is expanded to ``[B, H, Nq, Nk]`` in storage whose last dimension is padded to a
    multiple of 8 elements, which xformers requires of a bias tensor.
    """
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill_(~bias, float("-inf"))
    B, H, Nq = q.shape[0], q.shape[1], q.shape[2]
    Nk = bias.shape[-1]
    pad = -(-Nk // 8) * 8
    out = torch.empty(B, H, Nq, pad, dtype=q.dtype, device=q.device)[..., :Nk]
    out.copy_(bias.to(dtype=q.dtype, device=q.device).expand(B, H, Nq, Nk))
    return out


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, scale: float | None = None) -> Tensor:
    """``softmax(q kᵀ · scale + bias) v`` for ``q [B, H, Nq, d]``, ``k, v [B, H, Nk, d]`` (SDPA's layout).

    ``bias`` is an additive float bias broadcastable to ``[B, H, Nq, Nk]``, or a bool mask of that
    shape where True means "may attend" (SDPA's convention). ``scale`` defaults to ``d ** -0.5``.
    Runs on xformers or SDPA (see :func:`backend_name`); the result is the same up to rounding.
    """
    global _LAST
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputError(
            f"attention takes q, k, v as [B, H, N, d] tensors, got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    backend = backend_name(q.device, q.dtype, bias is not None)
    if backend == "xformers":
        b = _as_additive_bias(bias, q) if bias is not None else None
        out = _xformers_call(_xformers_ops(), q, k, v, b, scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    _LAST = backend
    return out


# ---------------------------------------------------------------------- CLS row
_EYES: dict[tuple[int, float, torch.device], Tensor] = {}


def _scaled_eye(h: int, scale: float, device: torch.device) -> Tensor:
    key = (h, float(scale), device)
    if key not in _EYES:
        _EYES[key] = (torch.eye(h, device=device) * scale).view(1, h, 1, h)
    return _EYES[key]


def cls_attention(q_cls: Tensor, k: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Scaled logits and softmax probabilities of the CLS query's row, per head.

    ``q_cls [B, H, d]`` is the CLS token's query and ``k [B, H, N, d]`` the keys of all ``N``
    tokens (any strides), both *before* scaling; ``scale`` is the attention's ``1/sqrt(d)``.
    Returns ``(logits, probs)``, each ``[B, H, N]`` float32: ``logits = q·k · scale`` and
    ``probs = softmax(logits)`` over all ``N`` keys. Costs ``O(N·d)`` per head.

    The product is one float32 batched GEMM of the keys as a tower lays them out, ``[B, N, H·d]``
    (a view of the k projection's output for HF and timm), against a block-diagonal ``[B, H·d, H]``
    matrix holding each head's scaled query: no copy of the keys beyond the float32 cast, a few
    kernel launches per layer whatever ``H``.
    """
    B, H, N, d = k.shape
    keys = k.transpose(1, 2).reshape(B, N, H * d).float()  # a view when k came from a [B, N, H*d] projection
    q = (q_cls.unsqueeze(-1) * _scaled_eye(H, scale, q_cls.device)).reshape(B, H * d, H)  # float32
    logits = torch.bmm(keys, q).transpose(1, 2)
    return logits, logits.softmax(-1)


def _in_proj(w: Tensor, b: Tensor | None, num_heads: int) -> tuple[Tensor, Tensor | None]:
    D = w.shape[1]
    d = w.shape[0] // num_heads
    return w.view(num_heads, d, D), None if b is None else b.view(num_heads, d)


def cls_attention_from_input(
    x: Tensor,
    w_q: Tensor,
    b_q: Tensor | None,
    w_k: Tensor,
    b_k: Tensor | None,
    num_heads: int,
    scale: float | None = None,
    cls_index: int = 0,
) -> tuple[Tensor, Tensor]:
    """The CLS row of self-attention computed from the block's input ``x [B, N, D]``.

    ``w_q, w_k [H·d, D]`` and ``b_q, b_k [H·d]`` are the query and key projections (rows of an
    ``in_proj_weight``). With ``q_h = W_q,h x_cls + b_q,h`` the CLS query of head ``h``, the logit
    against token ``j`` is ``q_h · (W_k,h x_j + b_k,h) = (W_k,hᵀ q_h) · x_j + q_h · b_k,h``: one
    ``[D]`` vector per head and image dotted with every token, ``O(N·D)`` per head, and the keys are
    never projected. Returns ``(logits, probs)`` ``[B, H, N]`` float32 as :func:`cls_attention`.
    """
    H = num_heads
    wq, bq = _in_proj(w_q.float(), None if b_q is None else b_q.float(), H)
    wk, bk = _in_proj(w_k.float(), None if b_k is None else b_k.float(), H)
    if scale is None:
        scale = 1.0 / math.sqrt(wq.shape[1])
    xf = x.float()
    q = torch.einsum("bD,hdD->bhd", xf[:, cls_index], wq)
    if bq is not None:
        q = q + bq
    u = torch.einsum("bhd,hdD->bhD", q, wk)  # the CLS query pulled back through the key projection
    logits = torch.einsum("bnD,bhD->bhn", xf, u)
    if bk is not None:
        logits = logits + torch.einsum("bhd,hd->bh", q, bk).unsqueeze(-1)
    logits = logits * scale
    return logits, logits.softmax(-1)


def head_mean_keys_from_input(x: Tensor, w_k: Tensor, b_k: Tensor | None, num_heads: int) -> Tensor:
    """Head-mean keys ``[B, N, d]`` from the block input ``x [B, N, D]`` and the key projection.

    The mean over heads of ``W_k,h x + b_k,h`` is one ``[d, D]`` projection, so this costs
    ``1/H`` of projecting the keys. Computed in ``x``'s dtype.
    """
    wk, bk = _in_proj(w_k, b_k, num_heads)
    wk = wk.mean(0).to(x.dtype)
    return F.linear(x, wk, None if bk is None else bk.mean(0).to(x.dtype))
