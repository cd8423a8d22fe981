"""The model adapters: one :class:`ModelAdapter` per model family, picked from the model's class.

:func:`adapter_for` returns the adapter of a model instance (the family whose transformers class
is nearest in the model's class hierarchy), or raises :class:`~vtc.errors.UnsupportedModelError`
listing the supported families. :func:`register_adapter` adds a family (a decorator on the
adapter class); the built-in families are LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision and Qwen VL (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL). :func:`adapter_class_for_config` finds a family from a bare config's
``model_type`` (the FLOPs of a checkpoint need only its config).
"""

from __future__ import annotations

from typing import Any

from vtc.errors import UnsupportedModelError
from vtc.integrations.adapters.base import Encoded, ModelAdapter

__all__ = ["ModelAdapter", "Encoded", "register_adapter", "adapter_for", "adapter_class_for_config", "families"]

_ADAPTERS: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Register an adapter class (decorator). Its ``class_names`` say which models it serves."""
    if cls not in _ADAPTERS:
        _ADAPTERS.append(cls)
    return cls


def _builtin() -> None:
    from vtc.integrations.adapters import llava, llava_next, llava_onevision, qwen_vl  # noqa: F401 - they register themselves


def families() -> list[tuple[str, tuple[str, ...]]]:
    """``(family, transformers class names)`` of every registered adapter."""
    _builtin()
    return [(cls.family, cls.class_names) for cls in _ADAPTERS]


def adapter_for(model: Any) -> ModelAdapter:
    """The adapter of ``model`` (see the module docstring)."""
    _builtin()
    best, depth = None, None
    mro = type(model).__mro__
    for cls in _ADAPTERS:
        for klass in cls.model_classes():
            if klass in mro and (depth is None or mro.index(klass) < depth):
                best, depth = cls, mro.index(klass)
    if best is None:
        listed = "; ".join(f"{fam} ({', '.join(names)})" for fam, names in families())
        raise UnsupportedModelError(
            f"vtc.apply supports the transformers model families {listed}, not {type(model).__name__}. For your "
            "own LLaVA-style code use vtc.integrations.VisualCompressor(tower, projector, pipeline); for another "
            "family, write an adapter (vtc/integrations/README.md)")
    return best(model)


def adapter_class_for_config(config: Any) -> type[ModelAdapter] | None:
    """The adapter class of a config's ``model_type`` (None if no family claims it)."""
    _builtin()
    model_type = getattr(config, "model_type", None)
    return next((cls for cls in _ADAPTERS if model_type in cls.model_types), None)
