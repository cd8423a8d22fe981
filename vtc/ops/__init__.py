"""The built-in operators, one module per method; importing this package registers them all."""

from vtc.ops import divprune, globalcom2, hired, m3, mqt, pool, random, tome, uniform, vtc_cls  # noqa: F401
from vtc.ops.base import Allocator, OpConfig, Operator, SelectConfig, Selector

__all__ = ["Operator", "Selector", "Allocator", "OpConfig", "SelectConfig"]
