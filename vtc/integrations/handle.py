"""Handle: what ``vtc.apply`` returns; undoes every change it made to one model instance.

Everything an integration changes goes through :meth:`Handle.set_attr` (an attribute on the
instance, never on its class) or :meth:`Handle.on_remove` (e.g. removing a tap's hooks), so
:meth:`Handle.remove` restores the model exactly: afterwards its ``__dict__`` and its modules'
hooks are what they were. The handle is a context manager (``with vtc.apply(model, p): ...``)
and records what the latest compressed forward did in :attr:`Handle.last`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from vtc.errors import ConfigError

__all__ = ["Handle", "Compressed"]

_MISSING = object()


@dataclass
class Compressed:
    """What the latest prefill with images sent to the language model.

    ``counts[i]``: visual tokens image ``i`` kept (newline tokens included); ``stock_counts[i]``:
    what the unwrapped model would have used. ``index[i]``: for each token image ``i`` sends, in
    sequence order, its original index (for LLaVA-NeXT the position in the concatenation of all
    partitions' patch tokens; a newline token has an index >= ``num_patches[i]``).
    ``positions``: ``[B, Lc]`` original position in the prompt of each slot of the compacted
    sequence (-1 for padding), i.e. which prompt position each returned logit belongs to.
    ``tokens``: the final LLM-width :class:`~vtc.tokens.VisualTokens`.
    """

    counts: list[int]
    stock_counts: list[int]
    index: list[Tensor]
    num_patches: list[int]
    positions: Tensor | None = None
    tokens: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class Handle:
    """The result of ``vtc.apply`` (see the module docstring)."""

    def __init__(self, model: Any, pipeline: Any, options: Any) -> None:
        self.model = model
        self.pipeline = pipeline
        self.options = options
        self.last: Compressed | None = None
        self._undo: list[Callable[[], None]] = []
        self.active = True

    # ------------------------------------------------------------------ recording changes
    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` on the instance; :meth:`remove` puts back what was there."""
        before = obj.__dict__.get(name, _MISSING)

        def undo() -> None:
            if before is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = before
        obj.__dict__[name] = value
        self._undo.append(undo)

    def on_remove(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    # ------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Restore the model exactly as it was (idempotent)."""
        if not self.active:
            return
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as e:  # keep undoing the rest
                errors.append(e)
        self.active = False
        if errors:
            raise errors[0]

    def check_active(self) -> None:
        if not self.active:
            raise ConfigError("this vtc handle was removed; call vtc.apply again")

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<vtc.Handle {state}: {type(self.model).__name__} with {self.pipeline} ({self.options})>"
