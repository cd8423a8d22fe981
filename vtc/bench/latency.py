"""Measured latency per stage and peak memory of one generation, after warm-up, over repeats.

:func:`profile` times one batch of prepared inputs through ``model.generate``:

- ``vision``, ``projector``, ``operators`` and ``prefill``: forward hooks around the vision tower,
  the multimodal projector, each pipeline operator, and the language model's prefill call (in-LLM
  operators run inside the prefill: their time counts in ``prefill`` and again in ``operators``);
- ``ttft``: time to first token, a whole ``generate(max_new_tokens=1)``;
- ``tpot``: time per output token, the mean duration of the model's forward calls after the
  first in a ``generate`` of exactly ``G`` tokens (``min_new_tokens=G``), i.e. the decode steps.

On CUDA the stages are timed with CUDA events (read after one synchronisation per repeat) and
the wall times with ``perf_counter`` around a synchronised call; on CPU everything is
``perf_counter``. Each figure is reported as the median and the 90th percentile (linear
interpolation) of ``repeats`` runs that follow ``warmup`` untimed runs. Peak memory is CUDA's
``max_memory_allocated`` on GPU, else the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` where Linux allows it, else the lifetime peak, which the result flags).
Speed claims come from these profiles run side by side in one run, never from tests.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vtc.bench.attach import language_model, projector, vision_tower
from vtc.bench.memory import proc_status, reset_rss_peak
from vtc.errors import ConfigError, UnsupportedModelError
from vtc.integrations.kv_cache import cache_in, cache_length

__all__ = ["LatencyConfig", "profile", "summarize", "StageClock", "peak_memory", "reset_peak_memory"]


@dataclass
class LatencyConfig:
    """``warmup`` untimed runs, ``repeats`` timed runs, ``new_tokens`` (G) for TPOT, ``batch`` questions per input."""

    warmup: int = 1
    repeats: int = 3
    new_tokens: int = 8
    batch: int = 1
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0 or self.new_tokens < 2 or self.batch < 1:
            raise ConfigError("latency needs repeats >= 1, warmup >= 0, new_tokens >= 2 and batch >= 1, got "
                              f"repeats={self.repeats}, warmup={self.warmup}, new_tokens={self.new_tokens}, batch={self.batch}")

    @classmethod
    def from_config(cls, data: Any) -> LatencyConfig:
        if data is None or data is True:
            return cls()
        if data is False:
            return cls(enabled=False)
        if not isinstance(data, Mapping):
            raise ConfigError(f"latency: expected a mapping (warmup, repeats, new_tokens, batch) or true/false, got {data!r}")
        unknown = set(data) - {"warmup", "repeats", "new_tokens", "batch", "enabled"}
        if unknown:
            raise ConfigError(f"latency: unknown key(s) {sorted(unknown)}; valid: warmup, repeats, new_tokens, batch, enabled")
        return cls(**data)


def summarize(samples: list[float]) -> dict[str, float]:
    """``{"median", "p90", "n"}`` of a list of timings (NaN when empty)."""
    if not samples:
        return {"median": float("nan"), "p90": float("nan"), "n": 0}
    s = sorted(samples)
    pos = 0.9 * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    p90 = s[lo] + (s[hi] - s[lo]) * (pos - lo)
    return {"median": statistics.median(s), "p90": p90, "n": len(s)}


class StageClock:
    """Accumulates the time spent inside named stages (CUDA events on GPU, perf_counter on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._open: dict[str, Any] = {}
        self._done: dict[str, list[tuple[Any, Any]]] = {}

    def _now(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self, name: str) -> None:
        self._open[name] = self._now()

    def stop(self, name: str) -> None:
        if name in self._open:
            self._done.setdefault(name, []).append((self._open.pop(name), self._now()))

    def reset(self) -> None:
        self._open.clear()
        self._done.clear()

    def intervals_ms(self) -> dict[str, list[float]]:
        """Milliseconds of each interval per stage since the last reset (synchronises CUDA once)."""
        if self.cuda:
            torch.cuda.synchronize()
            return {k: [a.elapsed_time(b) for a, b in v] for k, v in self._done.items()}
        return {k: [1e3 * (b - a) for a, b in v] for k, v in self._done.items()}

    def totals_ms(self) -> dict[str, float]:
        """Milliseconds per stage since the last reset (summed over its intervals)."""
        return {k: sum(v) for k, v in self.intervals_ms().items()}


def _hook_stage(module: nn.Module, clock: StageClock, name: str, when: Callable[..., bool] | None = None) -> list[Any]:
    state = {"on": False}

    def pre(mod, args, kwargs):
        state["on"] = when is None or when(args, kwargs)
        if state["on"]:
            clock.start(name)

    def post(mod, args, kwargs, out):
        if state["on"]:
            clock.stop(name)
            state["on"] = False

    return [module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post, with_kwargs=True)]


class _TimedMethod:
    """Times calls of ``obj.name`` on ``clock`` under ``stage`` until :meth:`remove` (instance attribute)."""

    def __init__(self, obj: Any, name: str, clock: StageClock, stage: str) -> None:
        self.obj, self.name = obj, name
        self.saved = obj.__dict__.get(name)  # an instance attribute of the caller's, put back by remove()
        inner = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            clock.start(stage)
            try:
                return inner(*args, **kwargs)
            finally:
                clock.stop(stage)

        setattr(obj, name, timed)

    def remove(self) -> None:
        if self.saved is None:
            self.obj.__dict__.pop(self.name, None)
        else:
            setattr(self.obj, self.name, self.saved)


def _is_prefill(args: tuple, kwargs: dict) -> bool:
    return cache_length(cache_in(kwargs)) == 0


def reset_peak_memory(device: torch.device) -> bool:
    """Reset the peak-memory counter; False when only a lifetime peak is available."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return reset_rss_peak()


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """``(bytes, kind)``: CUDA max allocated on GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    hwm = proc_status("VmHWM")
    if hwm is not None:
        return hwm, "rss_peak"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "rss_lifetime_peak"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def profile(model: nn.Module, inputs: Mapping[str, Any], config: LatencyConfig | None = None,
            pipeline: Any = None) -> dict[str, Any]:
    """Latency per stage and peak memory of ``model.generate(**inputs)`` (see the module docstring)."""
    cfg = config or LatencyConfig()
    device = next(iter(model.parameters())).device
    clock = StageClock(device)
    hooks = []
    hooks += _hook_stage(vision_tower(model), clock, "vision")
    try:
        hooks += _hook_stage(projector(model), clock, "projector")
    except UnsupportedModelError:
        pass
    hooks += _hook_stage(language_model(model), clock, "prefill", when=_is_prefill)
    for op in (pipeline or []):
        hooks += _hook_stage(op, clock, "operators")
        if getattr(op, "allocates", False):  # handing its budgets on, an allocator runs allocate(), not forward
            hooks.append(_TimedMethod(op, "allocate", clock, "operators"))
    gen = dict(do_sample=False, num_beams=1)

    def run(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **gen)
        _sync(device)
        return 1e3 * (time.perf_counter() - t0)

    try:
        for _ in range(cfg.warmup):
            run(1)
        stages: dict[str, list[float]] = {}
        ttft = []
        for _ in range(cfg.repeats):
            clock.reset()
            ttft.append(run(1))
            for k, v in clock.totals_ms().items():
                stages.setdefault(k, []).append(v)
        exact_reset = reset_peak_memory(device)
        tpot = []
        steps = _hook_stage(model, clock, "step")
        try:
            for _ in range(cfg.repeats):
                clock.reset()
                run(cfg.new_tokens)
                decode = clock.intervals_ms().get("step", [])[1:]
                if decode:
                    tpot.append(sum(decode) / len(decode))
        finally:
            for h in steps:
                h.remove()
        mem, kind = peak_memory(device)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, Any] = {f"{k}_ms": summarize(v) for k, v in stages.items()}
    out["ttft_ms"] = summarize(ttft)
    out["tpot_ms"] = summarize(tpot)
    out["peak_mem_bytes"] = mem
    out["peak_mem_kind"] = kind if exact_reset else kind + "_lifetime"
    out["settings"] = {"warmup": cfg.warmup, "repeats": cfg.repeats, "new_tokens": cfg.new_tokens, "batch": cfg.batch}
    return out
