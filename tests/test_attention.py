"""vtc.attention: backend choice (xformers probe, SDPA fallback) and the CLS-row helpers against full attention."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

import vtc.attention as A
from vtc.errors import InputError


def reference(q, k, v, bias=None, scale=None):
    """softmax(q kᵀ · scale + bias) v with the full map, written out."""
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias
    return s.softmax(-1) @ v


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 3, n, 16, generator=g) for n in (5, 7, 7))


@pytest.fixture
def fresh(monkeypatch):
    """A clean backend cache, restored afterwards."""
    monkeypatch.setattr(A, "_BACKENDS", {})
    monkeypatch.setattr(A, "_XOPS", None)
    return A


def test_cpu_uses_sdpa_without_importing_xformers(fresh, qkv, monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # importing it would raise
    assert fresh.backend_name("cpu", torch.float32) == "sdpa"
    assert fresh.backend_name(torch.device("cpu"), torch.bfloat16, bias=True) == "sdpa"
    if not torch.cuda.is_available():
        assert fresh.backend_name() == "sdpa"  # defaults: this machine's device and dtype
    q, k, v = qkv
    torch.testing.assert_close(fresh.attention(q, k, v), reference(q, k, v), atol=1e-5, rtol=1e-5)
    assert fresh.last_backend() == "sdpa" and fresh._XOPS is None


def test_bias_and_mask_and_scale(qkv):
    q, k, v = qkv
    mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    bias = torch.randn(1, 3, 5, 7)
    torch.testing.assert_close(A.attention(q, k, v, mask), reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(A.attention(q, k, v, bias, 0.5), reference(q, k, v, bias, 0.5), atol=1e-5, rtol=1e-5)


def test_wrong_rank_raises(qkv):
    q, k, v = qkv
    with pytest.raises(InputError, match=r"\[B, H, N, d\]"):
        A.attention(q[0], k, v)


@pytest.mark.parametrize("error", [ImportError, RuntimeError, OSError])
def test_xformers_failing_at_import_means_sdpa(fresh, monkeypatch, error):
    class Finder:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "xformers":
                raise error("xformers built for another torch")
            return None

    for name in [m for m in sys.modules if m.split(".")[0] == "xformers"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    assert fresh._xformers_ops() is None
    assert fresh._probe(torch.device("cpu"), torch.float32, False) == "sdpa"


def _fake_xformers(monkeypatch, impl):
    pkg, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = impl
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    calls = []

    def spy(*a, **kw):
        calls.append((a, kw))
        return impl(*a, **kw)

    ops.memory_efficient_attention = spy
    return calls


def _bmhk_attention(q, k, v, attn_bias=None, scale=None):
    """A stand-in with xformers' calling convention: [B, N, H, d] in and out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attn_bias, scale=scale)
    return out.transpose(1, 2)


def test_probe_accepts_a_working_xformers_and_dispatch_transposes(fresh, monkeypatch, qkv):
    calls = _fake_xformers(monkeypatch, _bmhk_attention)
    assert fresh._probe(torch.device("cpu"), torch.float32, True) == "xformers"
    # pretend the probe chose xformers for CPU to exercise the dispatch path
    monkeypatch.setattr(fresh, "_BACKENDS", {("cpu", torch.float32, False): "xformers",
                                             ("cpu", torch.float32, True): "xformers"})
    q, k, v = qkv
    calls.clear()
    torch.testing.assert_close(fresh.attention(q, k, v), reference(q, k, v), atol=1e-5, rtol=1e-5)
    assert fresh.last_backend() == "xformers" and len(calls) == 1
    assert calls[0][0][0].shape == (2, 5, 3, 16)  # handed over as [B, N, H, d]
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[:, :, :, 3:] = False
    torch.testing.assert_close(fresh.attention(q, k, v, mask), reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    b = calls[-1][1]["attn_bias"]
    assert b.dtype == torch.float32 and b.shape == (2, 3, 5, 7) and b.stride(-2) % 8 == 0


@pytest.mark.parametrize("impl", ["raises", "wrong"])
def test_probe_rejects_a_broken_xformers(fresh, monkeypatch, impl):
    def raises(*a, **kw):
        raise NotImplementedError("no kernel for this device")

    def wrong(q, k, v, attn_bias=None, scale=None):
        return torch.zeros_like(q)

    _fake_xformers(monkeypatch, raises if impl == "raises" else wrong)
    assert fresh._probe(torch.device("cpu"), torch.float32, False) == "sdpa"


# ---------------------------------------------------------------------- CLS row
def test_cls_attention_is_row_zero_of_the_full_map():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 4, 9, 8, generator=g)
    full = q @ k.transpose(-1, -2) * 8**-0.5
    logits, probs = A.cls_attention(q[:, :, 0], k, 8**-0.5)
    torch.testing.assert_close(logits, full[:, :, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(probs, full.softmax(-1)[:, :, 0], atol=1e-6, rtol=0)
    assert logits.dtype == probs.dtype == torch.float32
    lo16, _ = A.cls_attention(q[:, :, 0].half(), k.half(), 8**-0.5)  # half inputs, float32 result
    assert lo16.dtype == torch.float32


def test_cls_attention_from_input_and_keys_match_explicit_projection():
    g = torch.Generator().manual_seed(4)
    B, N, D, H = 2, 10, 24, 3
    d = D // H
    x = torch.randn(B, N, D, generator=g)
    w, b = torch.randn(3 * D, D, generator=g) / D**0.5, torch.randn(3 * D, generator=g)
    q = F.linear(x, w[:D], b[:D]).view(B, N, H, d).transpose(1, 2)
    k = F.linear(x, w[D:2 * D], b[D:2 * D]).view(B, N, H, d).transpose(1, 2)
    full = (q @ k.transpose(-1, -2)) * d**-0.5
    logits, probs = A.cls_attention_from_input(x, w[:D], b[:D], w[D:2 * D], b[D:2 * D], H)
    torch.testing.assert_close(logits, full[:, :, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs, full.softmax(-1)[:, :, 0], atol=1e-6, rtol=0)
    no_bias, _ = A.cls_attention_from_input(x, w[:D], None, w[D:2 * D], None, H)
    qn = F.linear(x, w[:D]).view(B, N, H, d).transpose(1, 2)
    kn = F.linear(x, w[D:2 * D]).view(B, N, H, d).transpose(1, 2)
    torch.testing.assert_close(no_bias, (qn @ kn.transpose(-1, -2))[:, :, 0] * d**-0.5, atol=1e-5, rtol=1e-5)
    keys = A.head_mean_keys_from_input(x, w[D:2 * D], b[D:2 * D], H)
    torch.testing.assert_close(keys, k.mean(1), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_backends_agree_on_gpu(dtype):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 8, n, 64, generator=g).cuda().to(dtype) for n in (100, 77, 77))
    bias = torch.randn(2, 8, 100, 77, generator=g).cuda().to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    want = F.scaled_dot_product_attention(q, k, v).float()
    assert A.backend_name(q.device, dtype) in ("xformers", "sdpa")
    torch.testing.assert_close(A.attention(q, k, v).float(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(A.attention(q, k, v, bias).float(),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=bias).float(), atol=tol, rtol=tol)
    xops = A._xformers_ops()
    if xops is not None and A.backend_name(q.device, dtype) == "xformers":
        direct = A._xformers_call(xops, q, k, v, None, None).float()
        torch.testing.assert_close(direct, want, atol=tol, rtol=tol)
