"""The facts every bench row records about where it ran: device, dtype, attention backend, versions.

:func:`environment` returns a small flat dict (JSON-serialisable). The attention backend comes
from ``vtc.attention`` when that module is present, else from the model's
``attn_implementation`` and, for SDPA, which of torch's SDPA kernels are enabled on the device.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from typing import Any

import torch

__all__ = ["environment", "versions", "attention_backend", "device_name"]


@lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "timm", "open_clip", "xformers"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001 - optional package missing or broken
            continue
    import vtc

    out["vtc"] = vtc.__version__
    return out


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu:{platform.processor() or platform.machine()}x{torch.get_num_threads()}t"
    return str(device)


def attention_backend(model: Any = None, device: torch.device | str = "cpu") -> str:
    """The model's own attention implementation (``sdpa[flash,...]`` on CUDA, ``sdpa[cpu]``, ``eager``, ...)."""
    impl = None
    if model is not None:
        cfg = getattr(model, "config", None)
        text = getattr(cfg, "text_config", cfg)
        impl = getattr(text, "_attn_implementation", None) or getattr(cfg, "_attn_implementation", None)
    impl = impl or "sdpa"
    if impl == "sdpa" and torch.device(device).type == "cuda":
        kernels = [k for k, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                   ("mem_efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                   ("math", torch.backends.cuda.math_sdp_enabled())) if on]
        return f"sdpa[{','.join(kernels)}]"
    if impl == "sdpa":
        return "sdpa[cpu]"
    return str(impl)


def vtc_attention_backend(device: torch.device | str, dtype: torch.dtype | None) -> str:
    """The backend ``vtc.attention`` (taps, vtc's own attention) uses on this device and dtype."""
    from vtc.attention import backend_name

    return str(backend_name(torch.device(device), dtype))


def environment(model: Any = None, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> dict[str, Any]:
    """``{"device", "dtype", "attention" (the model's), "vtc_attention", **versions}`` for a row."""
    if dtype is None and model is not None:
        dtype = next(iter(model.parameters())).dtype
    dt = getattr(torch, str(dtype).replace("torch.", ""), None) if dtype is not None else None
    return {"device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "attention": attention_backend(model, device),
            "vtc_attention": vtc_attention_backend(device, dt if isinstance(dt, torch.dtype) else None), **versions()}
