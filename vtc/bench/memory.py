"""Peak memory of one bench cell, measured around the cell's own generation.

:class:`CellMemory` wraps the questions of one cell (model × task × pipeline × budget):

- **CUDA**: ``torch.cuda.reset_peak_memory_stats`` before, ``max_memory_allocated`` after: the
  most memory PyTorch held on the device at once during the cell, weights included
  (kind ``"cuda_max_allocated"``). ``base_bytes`` is what was allocated when the cell started
  (the weights and anything else live), so ``peak - base`` is the cell's own working memory.
- **CPU**: there is no allocator counter, so the process's resident set is read from Linux: freed
  heap is first returned to the OS (glibc ``malloc_trim``), the peak-RSS counter is reset to the
  current RSS (``/proc/self/clear_refs``), and the cell's figure is its peak RSS minus the RSS at
  its start, i.e. the growth over the model's resident size and everything else already live
  (kind ``"cpu_rss_growth"``). Where the counter cannot be reset the figure is the growth of the
  process's lifetime peak, a lower bound flagged ``"cpu_rss_growth_lifetime"``; without
  ``/proc`` it is None.

Figures of cells of one run compare; a cell that resumed with nothing left to answer keeps the
figure of the run that answered it.
"""

from __future__ import annotations

import ctypes
import re
from typing import Any

import torch

__all__ = ["CellMemory", "rss_bytes", "proc_status", "reset_rss_peak"]


def proc_status(field: str) -> int | None:
    """A size field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"{field}:\s+(\d+)\s+kB", fh.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def rss_bytes() -> int | None:
    """The process's current resident set size (Linux), or None."""
    return proc_status("VmRSS")


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_rss_peak() -> bool:
    """Reset the peak-RSS counter to the current RSS (Linux ``clear_refs``); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class CellMemory:
    """Context manager measuring a cell's peak memory on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._result: dict[str, Any] | None = None

    def __enter__(self) -> CellMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = int(torch.cuda.memory_allocated(self.device))
        else:
            _trim()
            self._exact = reset_rss_peak()
            self._base = rss_bytes()
            self._hwm0 = proc_status("VmHWM")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = int(torch.cuda.max_memory_allocated(self.device))
            self._result = {"peak_bytes": peak, "base_bytes": self._base, "kind": "cuda_max_allocated"}
            return
        hwm = proc_status("VmHWM")
        if hwm is None or self._base is None:
            self._result = {"peak_bytes": None, "base_bytes": None, "kind": "unavailable"}
            return
        if self._exact:
            growth, kind = max(0, hwm - self._base), "cpu_rss_growth"
        else:  # only the lifetime peak: how far this cell pushed it
            growth, kind = max(0, hwm - max(self._base, self._hwm0 or 0)), "cpu_rss_growth_lifetime"
        self._result = {"peak_bytes": growth, "base_bytes": self._base, "kind": kind}

    def result(self) -> dict[str, Any] | None:
        """``{"peak_bytes", "base_bytes", "kind"}`` after the block, else None."""
        return self._result
