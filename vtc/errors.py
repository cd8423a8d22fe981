"""The exceptions vtc raises.

Every error a user can cause is a subclass of :class:`VtcError`, and every message says what
was wrong and what to do about it. Each class also derives from the builtin exception a
caller would naturally catch (``ValueError``, ``KeyError``, ...), so generic handlers work.
"""

from __future__ import annotations


class VtcError(Exception):
    """Base class of every vtc error."""


class ConfigError(VtcError, ValueError):
    """A pipeline or operator configuration is invalid (unknown name, argument or value)."""


class BudgetError(VtcError, ValueError):
    """A token budget cannot be honoured (non-positive keep, ratio outside (0, 1], ...)."""


class InputError(VtcError, ValueError):
    """Token features or side inputs are malformed (NaN/Inf, wrong shape, misaligned fields)."""


class SignalError(VtcError, KeyError):
    """An operator needs a signal (CLS attention, keys, ...) that was not recorded."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class LayoutError(VtcError, ValueError):
    """The grid/partition layout of the tokens is missing or inconsistent with the operator."""


class UnsupportedModelError(VtcError, TypeError):
    """vtc does not know how to attach to this model or vision tower."""


class TapError(VtcError, RuntimeError):
    """A tap could not record what was asked (layer out of range, no CLS token, ...)."""


class RunFolderError(VtcError, RuntimeError):
    """A bench run folder cannot be used as it is (a damaged file, a folder another run holds)."""


class RunLockedError(RunFolderError):
    """Another ``vtc bench`` process is running on the same run folder."""
