"""Where a transformers call carries its KV cache: ``cache`` (transformers >= 5.24) or
``past_key_values`` (earlier 5.x releases), in a forward's keyword arguments and in its output.

vtc's hooks read the cache to tell a prefill from a decoding step and to find the state kept per
compacted cache; these helpers let them do so on every supported release.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CACHE_ARGS", "cache_in", "cache_out", "cache_length"]

#: keyword names a forward's KV cache may come under, newest first
CACHE_ARGS: tuple[str, ...] = ("cache", "past_key_values")


def cache_in(kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward call was given (None if none)."""
    for name in CACHE_ARGS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def cache_out(output: Any) -> Any:
    """The KV cache a forward returned (None if none). An output that has the newest field is not
    asked for older names (reading ``past_key_values`` there is deprecated and warns)."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    names = next(([n] for n in CACHE_ARGS if n in fields), CACHE_ARGS)
    for name in names:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def cache_length(cache: Any) -> int:
    """Tokens the cache already holds (0 for None or an object without ``get_seq_length``)."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())
