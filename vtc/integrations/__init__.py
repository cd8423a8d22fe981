"""Integrations: attach a vtc pipeline to a model without forking it.

:func:`apply` finds the model's :class:`~vtc.integrations.adapters.ModelAdapter` from its class
(LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL / Qwen3-VL; :mod:`vtc.integrations.adapters`),
wraps the instance's ``forward`` (:mod:`vtc.integrations.wrapper`) and returns a :class:`Handle`
whose ``remove()`` restores the model exactly. For a user's own LLaVA-style code,
:class:`VisualCompressor` (:mod:`vtc.integrations.generic`) takes a vision tower, a projector and
a pipeline and returns the compressed projector outputs with their kept indices.
"""

from __future__ import annotations

from typing import Any

from vtc.integrations.generic import CompressedVisual, VisualCompressor
from vtc.integrations.handle import Compressed, Handle, handle_of, hook_keys
from vtc.integrations.options import ApplyOptions

__all__ = ["apply", "handle_of", "Handle", "Compressed", "ApplyOptions", "VisualCompressor", "CompressedVisual"]


def apply(model: Any, pipeline: Any, position_ids: str | None = None, **options: Any) -> Handle:
    """Compress ``model``'s visual tokens with ``pipeline`` until ``handle.remove()``.

    ``pipeline`` is a :class:`~vtc.pipeline.Pipeline` or anything :func:`vtc.build` accepts
    (``"divprune:keep=64"``). ``position_ids``: ``"contiguous"`` or ``"original"`` (default: the
    family's; Qwen VL's M-RoPE supports ``"original"`` only). LLaVA-NeXT options: ``newline``
    (``"auto"``, ``"rows"``, ``"unpadded_rows"``, ``"all_rows"``, ``"none"``), ``llm_view``
    (``"auto"``, ``"partitions"``, ``"assembled"``), ``unpad`` (bool), ``padding`` and ``unpad_rounding``; see
    :mod:`vtc.integrations.options`. Works as a context manager: ``with vtc.apply(m, p): ...``.
    ``copy.deepcopy(model)`` meanwhile gives a copy compressed by its own handle
    (:func:`handle_of`; :mod:`vtc.integrations.handle`).
    Raises :class:`~vtc.errors.UnsupportedModelError` (listing the supported families) for other models.
    """
    from vtc.integrations import wrapper
    from vtc.integrations.adapters import adapter_for
    from vtc.pipeline import build

    opts = ApplyOptions.from_kwargs({"position_ids": position_ids, **options})
    adapter = adapter_for(model)
    before = hook_keys(model)
    handle = wrapper.attach(model, adapter, build(pipeline), opts)
    handle.track_hooks(model, before)
    handle.copies_with_compression()
    return handle
