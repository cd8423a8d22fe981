"""AIM: merge visual tokens before the LLM, then prune them progressively inside it.

Paper: "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning" (Zhong et al.,
ICCV 2025). Two operators:

``aim_merge`` (stage ``vision``): AIM's iterative bipartite soft matching, ToMe's matching
(:func:`vtc.ops.tome.bipartite_step`: even positions are sources, odd ones destinations, cosine of
the metric, the ``r`` sources with the best match merge) with AIM's merge rule:

- ``compat="official"`` (default): a destination becomes the plain mean of itself and every source
  merged into it (``scatter_reduce(mean, include_self=True)``), with no size weights, so repeated
  merges are not averages over original patches; output order is AIM's ``[unmerged sources,
  destinations]`` after each step (the official code leaves the sort of the unmerged tokens
  commented out); a merged token's ``index`` is its destination's.
- ``compat="clean"``: size-weighted means (a token standing for more patches weighs more), and the
  final tokens sorted by the smallest original index each contains (which becomes its ``index``).

The metric (``metric="keys"``: the tap's head-mean ``keys`` of vision layer ``layer``; ``"x"``:
the features) is merged in lockstep by the same rule, so each step matches on merged metrics.
Schedule: ``r=[...]`` merges per step; ``keep=``/``ratio=`` merge up to half the tokens per step
until the budget is met; with neither, AIM's LLaVA-1.5 schedule ``r = [n//2, n//16]`` of the
``n`` input tokens (576 -> 288 -> 252, 43.75% kept). ``size`` always counts the patches a token
stands for. Default ``layer="last"``: AIM's image model reads the layer-23 keys (CLIP-L's
last layer, whose output LLaVA does not use) with all heads concatenated (1024-d); vtc's ``keys``
signal is the head-mean key, so ``metric="keys"`` matches on a different (64-d) vector: the nearest
vtc equivalent.

``aim`` (stage ``llm_layer``): after each layer ``l >= start``, visual tokens are ranked by PageRank
on that layer's attention: ``M = softmax(q kᵀ·scale / 0.1)`` (float32, causal and padding masked),
``d`` starts uniform (``1/N`` over the ``N`` valid tokens), ``d <- d M`` five times (no damping),
importance = RMS over heads of ``d``. The top ``int(n_in * rate_l)`` visual tokens stay (``n_in``:
visual tokens the LLM received), with ``rate_l = max(0, 1 - (l - start + 1) * step)``; text is
never dropped. Schedules: ``schedule="vicuna"`` (32-layer Vicuna: ``start=13``, 0.875 after layer
13 down to 0 after layer 20), ``"qwen2"`` (28-layer Qwen2: ``start=14``); ``start=``/``step=``
override them (``step=0`` keeps everything). Only the block of rows and columns from the first
visual token on is computed (causality: earlier rows never reach those columns, so the PageRank
values there are exactly those of the full map).

Official behaviour that vtc cannot reproduce: AIM masks pruned tokens instead of removing them, so
their queries still run and their rows still feed later layers' PageRank; vtc removes them (the
integration drops them from every later layer), so from the second pruning layer on the ranking is
over the surviving tokens' rows only. Position ids: ``"original"`` (masking keeps them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vtc.errors import BudgetError, ConfigError
from vtc.ops.base import SelectConfig, Selector
from vtc.ops.llm_layer import LayerConfig, LayerContext, LayerOperator, floor_count, keep_top_visual
from vtc.ops.tome import bipartite_step, sort_by_first, track_first
from vtc.registry import register
from vtc.taps.layers import Layer, check_layer
from vtc.tokens import VisualTokens

#: AIM's LLaVA-1.5 image schedule as fractions of the input count: r = 288 then 36 of 576
_DEFAULT_STEPS = (2, 16)


# ---------------------------------------------------------------------------------------- aim_merge
@dataclass
class AimMergeConfig(SelectConfig):
    """See the module docstring for each argument."""

    r: list[int] | None = None
    metric: Literal["keys", "x"] = "keys"
    layer: Layer = "last"
    compat: Literal["official", "clean"] = "official"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer(self.layer, "aim_merge.layer")
        if self.r is not None and (not self.r or any(v <= 0 for v in self.r)):
            raise BudgetError(f"aim_merge r= lists positive merges per step, got {self.r}")
        if self.r is not None and (self.keep is not None or self.ratio is not None):
            raise BudgetError("aim_merge takes r= (merges per step) or keep=/ratio=, not both")


@register("aim_merge")
class AimMerge(Selector):
    Config = AimMergeConfig
    default_stage = "vision"

    @property
    def requires(self) -> dict[str, list[int]]:
        return {"keys": [self.config.layer]} if self.config.metric == "keys" else {}

    def own_budget_args(self) -> list[str]:
        return [a for a in ("keep", "ratio", "r") if getattr(self.config, a, None) is not None]

    def _steps(self, counts: Tensor) -> list[Tensor]:
        """Merges per step ``[B]`` for the explicit or default schedule."""
        if self.config.r is not None:
            return [torch.full_like(counts, v) for v in self.config.r]
        return [counts // s for s in _DEFAULT_STEPS]

    def resolve_keep(self, counts: Tensor) -> Tensor:
        cfg = self.config
        if cfg.keep is None and cfg.ratio is None:
            n = counts.clone()
            for r in self._steps(counts):
                n = n - torch.minimum(r, n // 2)
            return n.clamp_min(1)
        return super().resolve_keep(counts)

    def select(self, tokens: VisualTokens, k: Tensor) -> VisualTokens:
        cfg = self.config
        clean = cfg.compat == "clean"
        if cfg.metric == "keys":
            tokens.signal("keys", cfg.layer, op="operator 'aim_merge'")
        if clean:
            tokens, G = track_first(tokens)
        # AIM's schedule (no keep=/ratio=) runs first, never below the budget ``k`` (which is the
        # schedule's own result unless an allocator set per-partition budgets); then up to half the
        # tokens merge per step until every row meets its budget
        schedule = self._steps(tokens.counts) if cfg.keep is None and cfg.ratio is None else []
        target = k.clamp_min(1)
        step = 0
        while True:
            n = tokens.counts
            r = torch.minimum(n - target, n // 2).clamp_min(0)
            if step < len(schedule):
                r = torch.minimum(r, schedule[step])
            elif not bool((r > 0).any()):
                break
            step += 1
            if step <= len(schedule) and not bool((r > 0).any()):
                continue
            metric = tokens.x if cfg.metric == "x" else tokens.signal("keys", cfg.layer, op="operator 'aim_merge'")
            assign, rep, slot_valid, _ = bipartite_step(metric, n, r, False, tokens.group)
            tokens = _merge(tokens, assign, rep, None if bool(slot_valid.all()) else slot_valid, weighted=clean)
        if clean:
            tokens = sort_by_first(tokens, G)
        if bool((k == 0).any()):
            tokens = tokens.keep_mask((k != 0).unsqueeze(1).expand(tokens.x.shape[:2]))
        return tokens


def _merge(tokens: VisualTokens, assign: Tensor, rep: Tensor, slot_valid: Tensor | None, *,
           weighted: bool) -> VisualTokens:
    """:meth:`VisualTokens.merge`, with AIM's unweighted mean unless ``weighted``; ``size`` is summed either way."""
    if weighted:
        return tokens.merge(assign, rep, slot_valid)
    out = tokens.replace(size=None).merge(assign, rep, slot_valid)  # every member weighs 1
    B, M = rep.shape
    live = (assign >= 0) & tokens.valid
    slot = torch.where(live, assign, torch.full_like(assign, M))
    w = tokens.sizes * live.to(tokens.sizes.dtype)
    size = torch.zeros(B, M + 1, dtype=w.dtype, device=w.device).scatter_add_(1, slot, w)[:, :M]
    if out.mask is not None:
        size = size.masked_fill(~out.mask, 0)
    return out.replace(size=size)


# ---------------------------------------------------------------------------------------- aim (in-LLM)
_SCHEDULES = {"vicuna": 13, "qwen2": 14}


@dataclass
class AimConfig(LayerConfig):
    """See the module docstring for each argument."""

    schedule: Literal["vicuna", "qwen2"] = "vicuna"
    start: int | None = None
    step: float = 0.125
    temperature: float = 0.1
    iterations: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            raise ConfigError(f"aim's layers follow its schedule; set start= and step=, not layers= (got {self.layers})")
        if not 0.0 <= self.step <= 1.0:
            raise ConfigError(f"aim step is the keep rate lost per layer, in [0, 1], got {self.step}")
        if self.temperature <= 0 or self.iterations < 1:
            raise ConfigError(f"aim needs temperature > 0 and iterations >= 1, got {self.temperature}, {self.iterations}")


@register("aim")
class Aim(LayerOperator):
    Config = AimConfig
    default_position_ids = "original"

    def _start(self, num_layers: int) -> int:
        s = self.config.start if self.config.start is not None else _SCHEDULES[self.config.schedule]
        return s + num_layers if s < 0 else s

    def default_layers(self, num_layers: int) -> list[int]:
        start = self._start(num_layers)
        if not 0 <= start < num_layers:
            raise ConfigError(f"aim starts after layer {start}, which a {num_layers}-layer model does not have; "
                              "set start=")
        step = self.config.step
        last = num_layers - 1 if step == 0 else min(num_layers - 1, start + math.ceil(1.0 / step - 1e-9) - 1)
        return list(range(start, last + 1))

    def rate(self, layer: int, num_layers: int) -> float:
        """The keep rate after ``layer``: ``max(0, 1 - (layer - start + 1) * step)``."""
        return max(0.0, 1.0 - (layer - self._start(num_layers) + 1) * self.config.step)

    def kept_visual(self, layer: int, alive: Tensor, visual_in: Tensor, num_layers: int) -> Tensor:
        return torch.minimum(alive, floor_count(visual_in, self.rate(layer, num_layers)))

    def decide(self, ctx: LayerContext) -> Tensor:
        k = self.kept_visual(ctx.layer, ctx.visual_counts, ctx.visual_in, ctx.num_layers)
        if bool((k >= ctx.visual_counts).all()):
            return torch.ones_like(ctx.visual)
        return keep_top_visual(ctx, pagerank(ctx, self.config.temperature, self.config.iterations), k)


def pagerank(ctx: LayerContext, temperature: float, iterations: int) -> Tensor:
    """``[B, L]`` AIM importance: RMS over heads of ``d M^iterations`` from ``d = 1/N`` (0 before the first
    visual token and on padding), with ``M`` this layer's attention at ``temperature``."""
    B, L = ctx.visual.shape
    dev = ctx.visual.device
    pos = torch.arange(L, device=dev).expand(B, L)
    first = torch.where(ctx.visual, pos, torch.full_like(pos, L)).min(1).values
    inside = ctx.valid & (pos >= first.unsqueeze(1))
    n = inside.sum(1)
    R = int(n.max().item()) if B else 0
    order = torch.sort((~inside).to(torch.uint8), dim=1, stable=True).indices[:, :R]  # block positions, in order
    live = torch.arange(R, device=dev).unsqueeze(0) < n.unsqueeze(1)
    rows = torch.where(live, order, torch.full_like(order, -1))
    M = ctx.attention_block(rows, rows, temperature)  # [B, H, R, R]
    N = ctx.valid.sum(1).to(torch.float32)
    d = (live.float() / N.unsqueeze(1)).unsqueeze(1).unsqueeze(2).expand(B, M.shape[1], 1, R)  # [B, H, 1, R]
    for _ in range(iterations):
        d = torch.matmul(d, M)
    imp = d.squeeze(2).pow(2).mean(1).sqrt()  # [B, R]
    out = torch.zeros(B, L + 1, dtype=imp.dtype, device=dev)
    out.scatter_(1, torch.where(live, order, torch.full_like(order, L)), imp)
    return out[:, :L]
