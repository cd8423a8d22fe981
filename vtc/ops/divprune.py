"""DivPrune: keep the most diverse visual tokens (max-min diversity, greedy).

Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et al.,
CVPR 2025). Described in methods.md §1.

Distances are ``1 - cos`` between tokens (post-projector embeddings by default: stage ``llm``).
The first pick is the most isolated token, then farthest-point insertion: each step picks the
token whose distance to the selected set is largest. Ties go to the lowest position, as
``torch.argmax`` does in the official code. A running minimum makes the loop O(k·N) per image
(the official code re-gathers the selected rows each step, O(k²·N): same picks). Output is in the
original (raster) order. ``k = round(ratio * N)``; the official default ratio is 0.098 (56/576).

On LLaVA-NeXT the official code runs on the assembled sequence (base, unpadded crops and their
newline tokens): ``anyres_view = "assembled"``, so ``vtc.apply`` assembles before DivPrune.

Precision. Distances are computed in the features' own dtype, in one ``[B, N, N]`` buffer, in
the official order of operations (``Xn = X / ||X||``, ``D = 1 - Xn Xnᵀ``; the first pick maximises
the 2nd-smallest entry of each column of ``D``, self-distance included): the official runs are fp16,
so fp16/bf16 inputs give the official picks in that precision. Float32 matmuls follow torch's
precision setting (full fp32 by default, as in the official runs; set
``torch.backends.cuda.matmul.allow_tf32 = True`` for TF32 on a GPU).

Differences from the official code, where it degenerates: a zero feature vector (the official
division gives NaN) counts as orthogonal to everything, and once every remaining distance is 0
(duplicate tokens such as LLaVA-NeXT newlines) the official loop may pick a token again, while vtc
always returns k distinct tokens.

Speed: each greedy step is 3 dispatched ops (argmax, a row gather, a running minimum) with no host
sync; on CUDA the loop runs through ``torch.compile`` (see :func:`set_compile`), falling back to
the eager loop if compilation fails.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vtc.errors import ConfigError
from vtc.ops.base import SelectConfig, Selector
from vtc.ops.selection import mask_from_order
from vtc.registry import register
from vtc.tokens import VisualTokens


@dataclass
class DivPruneConfig(SelectConfig):
    """``keep``/``ratio``: the budget (see SelectConfig)."""


def cosine_distance(x: Tensor) -> Tensor:
    """``1 - cos`` between all token pairs, ``[B, N, D] -> [B, N, N]`` in ``x``'s dtype, in the
    official order of operations (``Xn = X / ||X||``, ``1 - Xn @ Xnᵀ``) and in one buffer. A zero
    vector is left at 0 (distance 1 to everything) where the official division gives NaN."""
    norm = x.norm(dim=-1, keepdim=True)
    xn = x / norm.masked_fill(norm == 0, 1)
    return torch.bmm(xn, xn.transpose(1, 2)).neg_().add_(1)  # == 1 - sim, rounded once, in place


def _greedy_loop(dist: Tensor, first: Tensor, steps: int) -> Tensor:
    """``steps`` farthest-point picks ``[B, steps]`` starting at ``first`` ``[B]``. ``dist`` must
    hold -inf on its diagonal and in padding columns (picked tokens then stay at -inf in the
    running minimum and are never picked again). Three ops per step, no host sync."""
    rows = torch.arange(dist.shape[0], device=dist.device)
    mind = dist[rows, first]
    picks = [first]
    for _ in range(1, steps):
        pick = mind.argmax(1)
        picks.append(pick)
        mind = torch.minimum(mind, dist[rows, pick])
    return torch.stack(picks, 1)


_COMPILE = os.environ.get("VTC_DIVPRUNE_COMPILE", "auto")
_compiled: Callable | None = None


def set_compile(mode: Literal["auto", "always", "never"]) -> None:
    """How DivPrune's greedy loop runs: ``"auto"`` (default; ``torch.compile`` on CUDA, eager
    elsewhere), ``"always"`` (also on CPU; needs a C++ compiler) or ``"never"``. The environment
    variable ``VTC_DIVPRUNE_COMPILE`` sets the initial mode. Any compilation error falls back to
    the eager loop (with a warning) for the rest of the process."""
    global _COMPILE
    if mode not in ("auto", "always", "never"):
        raise ConfigError(f"divprune compile mode must be 'auto', 'always' or 'never', got {mode!r}")
    _COMPILE = mode


def _run_greedy(dist: Tensor, first: Tensor, steps: int) -> Tensor:
    global _COMPILE, _compiled
    use = _COMPILE == "always" or (_COMPILE == "auto" and dist.is_cuda)
    if use and steps > 1:
        try:
            if _compiled is None:
                _compiled = torch.compile(_greedy_loop, fullgraph=True, dynamic=False)
            return _compiled(dist, first, steps)
        except Exception as e:  # noqa: BLE001 - any backend failure: the eager loop gives the same picks
            warnings.warn(f"divprune: torch.compile of the greedy loop failed ({type(e).__name__}: {e}); "
                          "using the eager loop", RuntimeWarning, stacklevel=3)
            _COMPILE = "never"
    return _greedy_loop(dist, first, steps)


def divprune_order(x: Tensor, valid: Tensor | None, steps: int) -> Tensor:
    """The first ``steps`` greedy max-min picks of every image, in pick order: ``[B, steps]``.

    The greedy sequence is prefix-consistent, so the first ``k`` picks are DivPrune's answer for
    budget ``k``. Padding (``~valid``; None: no padding) is never picked; rows with fewer valid
    tokens than ``steps`` continue with arbitrary positions (callers only read the first
    ``k <= count`` entries).
    """
    inf = float("inf")
    dist = cosine_distance(x)
    if valid is not None:
        dist.masked_fill_(~valid.unsqueeze(2), inf)  # padding rows are nobody's nearest token
    # first pick: the 2nd-smallest entry of each column, self-distance included (hide one smallest)
    low, at = dist.min(dim=1, keepdim=True)
    dist.scatter_(1, at, inf)
    nearest = dist.amin(dim=1)
    dist.scatter_(1, at, low)
    dist.diagonal(dim1=1, dim2=2).fill_(-inf)  # a picked token stays at -inf in the running minimum
    if valid is not None:
        nearest = nearest.masked_fill(~valid, -inf)
        dist.masked_fill_(~valid.unsqueeze(1), -inf)  # padding columns are never picked
    return _run_greedy(dist, nearest.argmax(1), steps)


@register("divprune")
class DivPrune(Selector):
    Config = DivPruneConfig
    default_stage = "llm"
    anyres_view = "assembled"
    int_budget = True

    def select(self, tokens: VisualTokens, k: Tensor | int) -> VisualTokens:
        if isinstance(k, int):
            order = divprune_order(tokens.x, None, k)
            return tokens.gather(order.sort(dim=1).values)
        steps = int(k.max().item())
        if steps == 0:
            return tokens.keep_mask(torch.zeros_like(tokens.valid))
        order = divprune_order(tokens.x, tokens.mask, steps)
        return tokens.keep_mask(mask_from_order(order, k, tokens.num_tokens))
