"""Count what a call dispatches: aten ops and host synchronisations (for benchmarks and regression tests).

An operator's cost on a GPU is set less by its FLOPs than by how many kernels it launches and how
often the host must wait for the device (a ``.item()``, a ``bool(tensor)``, ``nonzero``, a shape
that depends on data). Both counts are deterministic and device-independent, so tests can gate
them on a CPU machine. :func:`count_ops` records every aten op dispatched under a
``TorchDispatchMode``; an op counts as a sync when it needs a value on the host:

- ``aten._local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``), ``aten.is_nonzero``,
  ``aten.equal``, ``Tensor.tolist()`` (which does not dispatch on CPU: it is patched for the call);
- ops whose output shape depends on the data: ``nonzero``, ``masked_select``, ``unique*``,
  ``bincount``, ``repeat_interleave`` without ``output_size``, boolean-mask indexing
  (``index``/``index_put_`` with a bool index);
- a copy from a non-CPU device to the CPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCount", "count_ops", "SYNC_OPS"]

#: aten op names (overload packet) that always wait for the device
SYNC_OPS = frozenset({
    "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "unique", "_unique", "_unique2",
    "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount", "histc", "allclose", "item",
})


@dataclass
class OpCount:
    """Dispatched aten ops of one call: ``ops`` (total), ``syncs`` (see the module docstring), and
    per-name tallies ``names`` / ``sync_names``."""

    ops: int = 0
    syncs: int = 0
    names: Counter = field(default_factory=Counter)
    sync_names: Counter = field(default_factory=Counter)

    def add(self, name: str, sync: bool) -> None:
        self.ops += 1
        self.names[name] += 1
        if sync:
            self.syncs += 1
            self.sync_names[name] += 1


def _is_sync(packet: str, args: tuple, kwargs: dict) -> bool:
    if packet in SYNC_OPS:
        return True
    if packet == "repeat_interleave":
        return kwargs.get("output_size") is None and not (len(args) > 3 and args[3] is not None)
    if packet in ("index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_"):
        idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (idx or ()))
    if packet in ("_to_copy", "copy_", "to"):
        src = args[1] if packet == "copy_" else args[0]
        dst_dev = kwargs.get("device") if packet != "copy_" else args[0].device
        return (isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_dev is not None
                and torch.device(dst_dev).type == "cpu")
    return False


class _Counter(TorchDispatchMode):
    def __init__(self, count: OpCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket.__name__
        self.count.add(str(func.overloadpacket).replace("aten.", ""), _is_sync(packet, args, kwargs))
        return func(*args, **kwargs)


def count_ops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, OpCount]:
    """Run ``fn(*args, **kwargs)`` and return ``(result, OpCount)``."""
    count = OpCount()
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        count.add("tolist", True)
        return tolist(self)

    torch.Tensor.tolist = counted_tolist
    try:
        with _Counter(count):
            out = fn(*args, **kwargs)
    finally:
        torch.Tensor.tolist = tolist
    return out, count
