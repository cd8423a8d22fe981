"""DivPrune: keep the most diverse visual tokens (max-min diversity, greedy).

Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et al.,
CVPR 2025). Described in methods.md §1.

Distances are ``1 - cos`` between tokens (post-projector embeddings by default: stage ``llm``).
The first pick is the most isolated token (largest distance to its nearest other token, i.e. the
2nd-smallest entry of its distance column), then farthest-point insertion: each step picks the
token whose distance to the selected set is largest. Ties go to the lowest position, as
``torch.argmax`` does in the official code. A running minimum makes the loop O(k·N) per image
(the official code re-gathers the selected rows each step, O(k²·N): same picks). Output is in the
original (raster) order. ``k = round(ratio * N)``; the official default ratio is 0.098 (56/576).

On LLaVA-NeXT the official code runs on the assembled sequence (base, unpadded crops and their
newline tokens): ``anyres_view = "assembled"``, so ``vtc.apply`` assembles before DivPrune.

Differences from the official code: the official loop may pick an already-selected token again
when every remaining distance is 0 (duplicate tokens such as LLaVA-NeXT newlines); vtc never
re-picks, so it always returns k distinct tokens. Half-precision inputs are scored in float32
(the official run is fp16, so near-ties can differ); fp32/fp64 inputs are scored as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtc.ops.base import SelectConfig, Selector
from vtc.ops.selection import mask_from_order
from vtc.registry import register
from vtc.tokens import VisualTokens


@dataclass
class DivPruneConfig(SelectConfig):
    """``keep``/``ratio``: the budget (see SelectConfig)."""


def cosine_distance(x: Tensor) -> Tensor:
    """``1 - cos`` between all token pairs: ``[B, N, D] -> [B, N, N]`` (no epsilon, like the official code)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return 1 - xn @ xn.transpose(1, 2)


def divprune_order(x: Tensor, valid: Tensor, steps: int) -> Tensor:
    """The first ``steps`` greedy max-min picks of every image, in pick order: ``[B, steps]``.

    The greedy sequence is prefix-consistent, so the first ``k`` picks are DivPrune's answer for
    budget ``k``. Padding (``~valid``) is never picked; rows with fewer valid tokens than
    ``steps`` repeat their last pick (callers only read the first ``k <= count`` entries).
    """
    B, N = valid.shape
    dist = cosine_distance(x)
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    # nearest-other distance of each column j: 2nd smallest over valid rows (the smallest is self)
    col = dist.masked_fill(~valid.unsqueeze(2), inf)
    nearest = col.topk(2, dim=1, largest=False).values[:, 1] if N >= 2 else torch.full_like(valid, inf, dtype=dist.dtype)
    nearest = nearest.masked_fill(~valid, -inf)
    rows = torch.arange(B, device=x.device)
    pick = nearest.argmax(1)
    picks = [pick]
    taken = torch.zeros_like(valid)
    taken[rows, pick] = True
    mind = dist[rows, pick]
    for _ in range(1, steps):
        cand = mind.masked_fill(taken | ~valid, -inf)
        nxt = cand.argmax(1)
        # a row with nothing left to pick keeps its previous pick (never read by callers)
        done = torch.isneginf(cand.gather(1, nxt.unsqueeze(1)).squeeze(1))
        pick = torch.where(done, pick, nxt)
        picks.append(pick)
        taken[rows, pick] = True
        mind = torch.minimum(mind, dist[rows, pick])
    return torch.stack(picks, 1)


@register("divprune")
class DivPrune(Selector):
    Config = DivPruneConfig
    default_stage = "llm"
    anyres_view = "assembled"

    def select(self, tokens: VisualTokens, k: Tensor) -> VisualTokens:
        steps = int(k.max().item())
        if steps == 0:
            return tokens.keep_mask(torch.zeros_like(tokens.valid))
        order = divprune_order(tokens.x, tokens.valid, steps)
        return tokens.keep_mask(mask_from_order(order, k, tokens.num_tokens))
