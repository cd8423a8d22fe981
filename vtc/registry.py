"""The operator registry: names to operator classes, and typed configs built from loose values.

``@register("divprune")`` on an :class:`~vtc.ops.base.Operator` subclass makes it buildable by
name. Each operator declares its arguments as a dataclass (``Config``); :func:`create` checks the
names and converts values (``"64"`` to ``64``, ``"[16, 17]"`` to ``[16, 17]``) against the field
types, so a config read from a string, a dict or a YAML file becomes the same typed object.
Unknown names and arguments raise :class:`~vtc.errors.ConfigError` listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from typing import TYPE_CHECKING, Any, Literal, Union

from vtc.errors import ConfigError

if TYPE_CHECKING:
    from vtc.ops.base import Operator

__all__ = ["register", "get_op", "list_ops", "create", "make_config", "yaml_load"]

_REGISTRY: dict[str, type[Operator]] = {}


def register(name: str):
    """Class decorator: register an operator class under ``name``."""
    if not isinstance(name, str) or not name or any(c in name for c in "|:,= "):
        raise ConfigError(f"operator names are non-empty and contain none of '|:,= ', got {name!r}")

    def deco(cls):
        from vtc.ops.base import Operator

        if not (isinstance(cls, type) and issubclass(cls, Operator)):
            raise ConfigError(f"@register({name!r}) must decorate a vtc.ops.base.Operator subclass, got {cls!r}")
        if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
            raise ConfigError(f"operator {name!r} ({cls.__name__}) needs a dataclass `Config` of its arguments")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"an operator named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _ensure_builtin() -> None:
    import vtc.ops  # noqa: F401  (registers the built-in operators)


def list_ops() -> list[str]:
    """Names of every registered operator, sorted."""
    _ensure_builtin()
    return sorted(_REGISTRY)


def get_op(name: str) -> type[Operator]:
    """The operator class registered under ``name``."""
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown operator {name!r}; registered operators: {', '.join(sorted(_REGISTRY))}") from None


def make_config(op_cls: type[Operator], args: dict[str, Any]) -> Any:
    """Build ``op_cls.Config`` from ``args``, checking names and converting values to field types."""
    cfg_cls = op_cls.Config
    fields = {f.name: f for f in dataclasses.fields(cfg_cls) if f.init}
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise ConfigError(
            f"operator {op_cls.name!r} has no argument(s) {', '.join(map(repr, unknown))}; "
            f"valid arguments: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cfg_cls)
    values = {k: coerce(v, hints[k], f"{op_cls.name}.{k}") for k, v in args.items()}
    try:
        return cfg_cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid arguments for operator {op_cls.name!r}: {e}") from e


def create(name: str, **kwargs: Any) -> Operator:
    """Instantiate the operator registered as ``name`` with keyword arguments (like timm's)."""
    cls = get_op(name)
    return cls(make_config(cls, kwargs))


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` that rejects a mapping naming the same key twice (PyYAML keeps the last).

    The document is composed with the safe loader first (nodes only, nothing constructed) to find
    repeated keys, then loaded with ``yaml.safe_load``.
    """
    import yaml

    def walk(node: Any) -> None:
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, value_node in node.value:
                key = (key_node.tag, key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
                if key is not None and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} is given twice; give each key once", key_node.start_mark)
                seen.add(key)
                walk(value_node)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)

    walk(yaml.compose(text, Loader=yaml.SafeLoader))
    return yaml.safe_load(text)


def _parse_scalar_string(value: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert ``value`` to the type ``hint`` or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.strip().lower() in ("none", "null", "~") and type(None) in args:
            return None
        alts = [a for a in args if a is not type(None)]
        if len(alts) == 1:  # Optional[X]: X's own message says what is wrong
            try:
                return coerce(value, alts[0], where)
            except ConfigError as e:
                raise ConfigError(f"{e}{' (or none)' if type(None) in args else ''}") from None
        errors = []
        # try the exact python type first so "1" does not become True
        for a in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(hint)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if isinstance(value, str) and hint is not str:
        value = _parse_scalar_string(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        # numbers.Integral/Real cover numpy scalars (np.int64(5)); NaN and infinities are no count
        if (_is_bool(value) or not isinstance(value, numbers.Real) or not math.isfinite(float(value))
                or int(value) != value):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if _is_bool(value) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if math.isnan(float(value)):
            raise ConfigError(f"{where}: expected a number, got NaN")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
            return tuple(coerce(v, a, where) for v, a in zip(value, args))
        inner = args[0] if args else Any
        out = [coerce(v, inner, where) for v in value]
        return tuple(out) if origin is tuple else out
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{where}: cannot use {value!r} as {_type_name(hint)}")


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool too


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(map(repr, typing.get_args(hint)))
    if origin in (Union, types.UnionType):
        parts = [_type_name(a) for a in typing.get_args(hint) if a is not type(None)]
        if type(None) in typing.get_args(hint):
            parts.append("None")
        return " | ".join(parts)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]" if args else origin.__name__
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
