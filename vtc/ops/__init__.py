"""The built-in operators, one module per method; importing this package registers them all."""

from vtc.ops import (  # noqa: F401
    aim,
    divprune,
    fastv,
    globalcom2,
    hiprune,
    hired,
    m3,
    mqt,
    pdrop,
    pool,
    random,
    router,
    sparsevlm,
    tome,
    uniform,
    visionzip,
    vtc_cls,
)
from vtc.ops.base import Allocator, OpConfig, Operator, SelectConfig, Selector
from vtc.ops.llm_layer import LayerContext, LayerOperator, LayerUpdate

__all__ = ["Operator", "Selector", "Allocator", "OpConfig", "SelectConfig", "LayerOperator", "LayerContext",
           "LayerUpdate"]
