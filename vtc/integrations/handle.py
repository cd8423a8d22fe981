"""Handle: what ``vtc.apply`` returns; undoes every change it made to one model instance.

Everything an integration changes goes through :meth:`Handle.set_attr` (an attribute on the
instance, never on its class) or :meth:`Handle.on_remove` (e.g. removing a tap's hooks), so
:meth:`Handle.remove` restores the model exactly: afterwards its ``__dict__`` and its modules'
hooks are what they were. The handle is a context manager (``with vtc.apply(model, p): ...``)
and records what the latest compressed forward did in :attr:`Handle.last`.

``copy.deepcopy`` of a model with an active handle gives a copy with its own compression: the copy
is made of the model as it was before ``vtc.apply`` (for the length of the copy, the wrapped
``forward``, the attributes the integration set and the hooks it added to any of the model's
modules are taken out, then put back as they were), and ``vtc.apply`` then attaches a deep copy of
the pipeline, with the same options, to the copy. The
copy's handle (:func:`handle_of`) is its own: removing either handle leaves the other model
compressed, and changing the copy's weights changes only the copy's outputs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from vtc.errors import ConfigError

__all__ = ["Handle", "Compressed", "handle_of"]

_MISSING = object()


def _restore_attr(obj: Any, name: str, value: Any) -> None:
    """Set ``obj.name = value`` on the instance, or remove the instance attribute if ``value`` is ``_MISSING``."""
    if value is _MISSING:
        obj.__dict__.pop(name, None)
    else:
        obj.__dict__[name] = value

#: the hook tables of a ``torch.nn.Module`` (what a tap or the in-LLM stage registers into)
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
              "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def hook_keys(model: Any) -> dict[tuple[int, str], set[Any]]:
    """The hook ids in every hook table of every module of ``model`` (to find later which were added)."""
    out = {}
    for m in model.modules():
        for name in HOOK_DICTS:
            d = m.__dict__.get(name)
            if isinstance(d, dict):
                out[(id(m), name)] = set(d)
    return out


def handle_of(model: Any) -> Handle | None:
    """The active :class:`Handle` of ``model`` (None if ``vtc.apply`` is not active on it)."""
    from vtc.integrations.wrapper import _MARK

    handle = getattr(model.__dict__.get("forward"), _MARK, None)
    return handle if handle is not None and handle.active else None


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
        self._attrs: list[tuple[Any, str, Any]] = []  # (object, name, value before) of set_attr
        self._hooks: list[tuple[Any, str, Any]] = []  # (module, hook table, hook id) added by the integration
        self.active = True

    # ------------------------------------------------------------------ recording changes
    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` on the instance; :meth:`remove` puts back what was there."""
        before = obj.__dict__.get(name, _MISSING)

        obj.__dict__[name] = value
        self._undo.append(lambda: _restore_attr(obj, name, before))
        self._attrs.append((obj, name, before))

    def on_remove(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def track_hooks(self, model: Any, before: dict[tuple[int, str], set[Any]]) -> None:
        """Record the hooks added to ``model``'s modules since :func:`hook_keys` gave ``before``."""
        for m in model.modules():
            for name in HOOK_DICTS:
                d = m.__dict__.get(name)
                if isinstance(d, dict):
                    self._hooks.extend((m, name, key) for key in d.keys() - before.get((id(m), name), set()))

    def copies_with_compression(self) -> None:
        """Make ``copy.deepcopy(model)`` give a copy with its own compression (see the module docstring)."""
        self.set_attr(self.model, "__deepcopy__", self._deepcopy)

    def _deepcopy(self, memo: dict[int, Any]) -> Any:
        from vtc.integrations import apply

        with self._suspended():  # the model exactly as before vtc.apply, for the length of the copy
            clone = copy.deepcopy(self.model, memo)
        options = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)}
        apply(clone, copy.deepcopy(self.pipeline, memo), **options)
        return clone

    @contextlib.contextmanager
    def _suspended(self) -> Iterator[None]:
        """Take out every attribute and hook the integration added (the earliest value recorded for an
        attribute is the one before vtc), then put back exactly what was there, hook order included."""
        saved_attrs = {}
        for obj, name, before in self._attrs:
            key = (id(obj), name)
            if key not in saved_attrs:
                saved_attrs[key] = (obj, name, obj.__dict__.get(name, _MISSING), before)
        tables = {(id(m), t): (m, t) for m, t, _ in self._hooks}
        saved_tables = {key: list(m.__dict__[t].items()) for key, (m, t) in tables.items()}
        ours = {(id(m), t, k) for m, t, k in self._hooks}
        try:
            for obj, name, _, before in saved_attrs.values():
                _restore_attr(obj, name, before)
            for key, (m, t) in tables.items():
                for k in [k for k in m.__dict__[t] if (key[0], t, k) in ours]:
                    del m.__dict__[t][k]
            yield
        finally:
            for obj, name, now, _ in saved_attrs.values():
                _restore_attr(obj, name, now)
            for key, (m, t) in tables.items():
                d = m.__dict__[t]
                d.clear()
                d.update(saved_tables[key])

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
