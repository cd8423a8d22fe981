"""Where the bench attaches a pipeline to a model, and how it counts the visual tokens the LLM gets.

:func:`attached` is the one seam between the harness and ``vtc.apply``: a context manager that
attaches the pipeline (nothing for the uncompressed baseline) and removes it afterwards. When
``vtc.apply`` is not available in this install, the model runs uncompressed and the result says
so (``applied=False``), which every row records, so such rows are never mistaken for compressed
ones.

:class:`PromptCounter` counts at the language model's input, with a forward pre-hook on the
decoder: at the prefill call it records each row's attended sequence length. The visual tokens
kept for a question are that length minus the question's text tokens, whatever the integration
did (compacted the sequence or masked tokens out).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vtc.errors import UnsupportedModelError
from vtc.integrations.adapters import adapter_for
from vtc.integrations.kv_cache import cache_in, cache_length

__all__ = ["Attachment", "attached", "PromptCounter", "language_model", "vision_tower", "projector"]


@dataclass
class Attachment:
    """What :func:`attached` did: ``applied`` is False when the pipeline could not be attached."""

    pipeline: Any
    handle: Any = None
    applied: bool = False
    note: str = ""

    def kept_tokens(self) -> list[int] | None:
        """Per-row kept visual tokens of the last prefill, if the handle reports them (``handle.last.counts``)."""
        last = getattr(self.handle, "last", None)
        counts = getattr(last, "counts", None)
        if counts is not None:
            return [int(v) for v in counts]
        for name in ("kept_tokens", "last_kept", "kept"):
            val = getattr(self.handle, name, None)
            if callable(val):
                val = val()
            if val is not None:
                return [int(v) for v in (val.tolist() if torch.is_tensor(val) else val)]
        return None


    def layer_visual(self) -> list[list[int]] | None:
        """Per row of the last prefill, the visual tokens each decoder layer processed, as the in-LLM
        stage measured them (``handle.last.extra["layer_visual"]``); None without in-LLM operators."""
        last = getattr(self.handle, "last", None)
        counts = (getattr(last, "extra", None) or {}).get("layer_visual")
        return None if counts is None else [[int(v) for v in row] for row in counts]


_warned: set[str] = set()


@contextmanager
def attached(model: nn.Module, pipeline: Any, **options: Any) -> Iterator[Attachment]:
    """Attach ``pipeline`` (a built :class:`vtc.Pipeline`, or None for the baseline) to ``model``.

    ``options`` go to ``vtc.apply`` (``position_ids``, LLaVA-NeXT ``newline`` / ``llm_view``, ...).
    """
    if pipeline is None or len(pipeline) == 0:
        yield Attachment(pipeline=None, applied=True, note="uncompressed")
        return
    try:
        from vtc.integrations import apply
    except ImportError:
        note = "vtc.integrations is not installed yet: ran uncompressed"
        if note not in _warned:
            warnings.warn(f"vtc bench: {note}; rows are marked applied=false", stacklevel=3)
            _warned.add(note)
        yield Attachment(pipeline=pipeline, applied=False, note=note)
        return
    handle = apply(model, pipeline, **options)
    try:
        yield Attachment(pipeline=pipeline, handle=handle, applied=True)
    finally:
        handle.remove()


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack of ``model``, from its adapter (:mod:`vtc.integrations.adapters`)."""
    return adapter_for(model).language_model


def vision_tower(model: nn.Module) -> nn.Module:
    return adapter_for(model).vision_tower


def projector(model: nn.Module) -> nn.Module:
    """The module mapping tower features to the LLM's width (Qwen VL: the tower's patch merger)."""
    mod = adapter_for(model).projector
    if mod is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no separate multimodal projector")
    return mod


class PromptCounter:
    """Records the attended prompt length per row at the LLM's prefill call (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.lengths: list[int] | None = None
        self._handle = language_model(model).register_forward_pre_hook(self._hook, with_kwargs=True)

    def reset(self) -> None:
        self.lengths = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.lengths is not None:
            return  # only the first (prefill) call of a generate
        if cache_length(cache_in(kwargs)) > 0:
            return
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and mask.dim() == 2:
            self.lengths = [int(v) for v in mask.sum(-1).tolist()]
        elif embeds is not None:
            self.lengths = [int(embeds.shape[1])] * int(embeds.shape[0])

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> PromptCounter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
