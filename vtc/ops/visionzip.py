"""VisionZip: keep the dominant tokens the vision tower attends to, merge the rest into a few.

Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (Yang et al.,
CVPR 2025). Stage ``vision``, on the feature layer's tokens, with the signals of that layer:

- dominant tokens: the patches with the highest ``cls_attn[layer]`` (post-softmax CLS->patch
  attention; the official code sums over heads, the head-mean ranks the same), kept in raster order.
  Towers without a CLS token: ``signal="attn_received"`` (the attention each token receives,
  averaged over all query rows and heads);
- contextual tokens: the remaining tokens, in order, are split into ``C`` targets, uniformly
  (positions ``0, s, 2s, ...`` of the remaining list with ``s = max(1, n_rem // C)``, the first
  ``C`` of them; not by similarity) and the others, each of which joins the target whose
  L2-normalised ``keys[layer]`` (head-mean keys) is most similar (cosine, ties: the first target).
  A contextual token is ``x_target + mean(x of the tokens that joined it)`` (the target *plus* the
  mean, 0 when none joined; not an average of the two, so it is not a convex mix).

Output per image (per partition, see below): ``[CLS, dominant (raster order), contextual (target
order)]``. Budget: ``dominant=`` and ``contextual=`` per partition (the official arguments), or
``keep=``/``ratio=`` split as the paper's settings do (54+10, 108+20, 162+30: ``C = k*5//32``).
Default ``layer="feature"``: the layer whose output the model uses (the official 22 on LLaVA-1.5's
CLIP-L; layer forms: :mod:`vtc.taps.layers`). ``size`` and additive
signals sum over a contextual token's members; ``index`` is the target's.

The CLS token. The official output includes the tower's CLS token (its feature-layer hidden
state, projected like the patches) and counts it among the ``D`` dominant tokens (``D - 1``
patches). ``VisualTokens`` carries only patch tokens, so:

- ``compat="official"`` (default): the integration must put each partition's CLS token into the
  tokens it hands to this operator, as the first token of the partition with
  ``index == CLS_INDEX`` (-1) and its own ``group``, its features the CLS hidden state of the
  feature layer, its signals any value (they are not read); it asks for it when
  :attr:`VisionZip.wants_cls_token` is true. The CLS token is kept first and counts as one dominant
  token. Without it the operator raises a :class:`~vtc.errors.SignalError`. Towers without CLS
  (``signal="attn_received"``) have none and use ``D`` patches.
- ``compat="clean"``: ``D`` dominant patches, no CLS token (a CLS token handed in is dropped).

LLaVA-NeXT: the official code runs per partition (each crop is an image); with
``per_partition=True`` (default) vtc does too: ``dominant``/``contextual`` apply to each partition,
and a ``keep=`` budget is split equally (``k // P``, floored under ``compat="official"``). The
official NeXT code also restores the kept crop tokens' spatial order without unpadding or newline
tokens: under ``compat="official"`` the operator declares ``newline_policy = "none"`` and
``sees_padding`` (pass ``vtc.apply(..., unpad=False)`` for the padded grid as well).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vtc.errors import BudgetError, SignalError
from vtc.ops.base import SelectConfig, Selector
from vtc.ops.budgets import OfficialSpatialMerge, PerPartition, partitions_per_image
from vtc.ops.selection import descending_order, mask_from_order
from vtc.registry import register
from vtc.taps.layers import Layer, check_layer
from vtc.tokens import VisualTokens

#: ``index`` of a tower's CLS token handed to VisionZip in official mode
CLS_INDEX = -1


@dataclass
class VisionZipConfig(SelectConfig):
    """See the module docstring for each argument."""

    dominant: int | None = None
    contextual: int | None = None
    signal: Literal["cls_attn", "attn_received"] = "cls_attn"
    layer: Layer = "feature"
    compat: Literal["official", "clean"] = "official"
    per_partition: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer(self.layer, "visionzip.layer")
        explicit = (self.dominant is not None, self.contextual is not None)
        if any(explicit) and not all(explicit):
            raise BudgetError("visionzip takes dominant= and contextual= together (or keep=/ratio=)")
        if all(explicit):
            if self.keep is not None or self.ratio is not None:
                raise BudgetError("visionzip takes dominant=/contextual= or keep=/ratio=, not both")
            if self.dominant < 1 or self.contextual < 0:
                raise BudgetError(f"visionzip needs dominant >= 1 and contextual >= 0, got {self.dominant}, {self.contextual}")


@register("visionzip")
class VisionZip(OfficialSpatialMerge, PerPartition, Selector):
    Config = VisionZipConfig
    default_stage = "vision"

    @property
    def requires(self) -> dict[str, list[int]]:
        return {self.config.signal: [self.config.layer], "keys": [self.config.layer]}

    @property
    def wants_cls_token(self) -> bool:
        """Whether the integration must hand in the tower's CLS token (see the module docstring)."""
        return self.config.compat == "official" and self.config.signal == "cls_attn"

    def own_budget_args(self) -> list[str]:
        return [a for a in ("keep", "ratio", "dominant", "contextual") if getattr(self.config, a) is not None]

    def resolve_keep(self, counts: Tensor) -> Tensor:
        cfg = self.config
        if cfg.dominant is not None:
            return torch.minimum(torch.full_like(counts, cfg.dominant + cfg.contextual), counts)
        return super().resolve_keep(counts)

    def partition_budget(self, tokens: VisualTokens) -> Tensor:
        cfg = self.config
        if cfg.dominant is None:
            return super().partition_budget(tokens)
        P = partitions_per_image(tokens)
        col = torch.arange(tokens.num_groups, device=tokens.device).unsqueeze(0)
        return torch.where(col < P.unsqueeze(1), cfg.dominant + cfg.contextual, 0).long()

    def split(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """``(D, C)`` ``[B]`` for per-row budgets ``k`` (``D`` counts the CLS token in official mode)."""
        cfg = self.config
        if cfg.dominant is not None:
            return torch.full_like(k, cfg.dominant), torch.full_like(k, cfg.contextual)
        C = k * 5 // 32
        return k - C, C

    def select(self, tokens: VisualTokens, k: Tensor) -> VisualTokens:
        cfg = self.config
        B, N = tokens.x.shape[:2]
        dev = tokens.device
        valid = tokens.valid
        is_cls = valid & (tokens.index == CLS_INDEX)
        patch = valid & ~is_cls
        if self.wants_cls_token:
            if not bool((is_cls.any(1) | ~valid.any(1)).all()):  # every non-empty row holds its CLS token
                raise SignalError(
                    "operator 'visionzip' with compat='official' includes the tower's CLS token, which the tokens do "
                    f"not hold: the integration must pass it as the first token (index {CLS_INDEX}) of each image or "
                    "partition; use compat='clean' to run without it"
                )
            has_cls = is_cls.long().sum(1)
        else:
            has_cls = torch.zeros(B, dtype=torch.long, device=dev)
            is_cls = torch.zeros_like(is_cls)
        D, C = self.split(k)
        score = tokens.signal(cfg.signal, cfg.layer, op="operator 'visionzip'")
        keys = tokens.signal("keys", cfg.layer, op="operator 'visionzip'")
        n_patch = patch.sum(1)
        d_patch = torch.minimum((D - has_cls).clamp_min(0), n_patch)
        dom = mask_from_order(descending_order(score.float(), patch), d_patch) & patch
        rem = patch & ~dom
        rank = torch.cumsum(rem.long(), 1) - 1  # position in the remaining list
        n_rem = rem.sum(1)
        step = torch.clamp_min(n_rem // C.clamp_min(1), 1)
        target = rem & (rank % step.unsqueeze(1) == 0) & (rank // step.unsqueeze(1) < C.unsqueeze(1))
        others = rem & ~target
        n_t = target.sum(1)
        T = int(n_t.max().item()) if B else 0
        t_pos = torch.sort((~target).to(torch.uint8), dim=1, stable=True).indices[:, :T]  # targets, in order
        t_live = torch.arange(T, device=dev).unsqueeze(0) < n_t.unsqueeze(1)
        # each other token joins its most similar target (cosine of the L2-normalised keys)
        m = keys.float() / keys.float().norm(dim=-1, keepdim=True)
        if T > 0:
            sim = torch.matmul(m, m.gather(1, t_pos.unsqueeze(-1).expand(B, T, m.shape[-1])).transpose(1, 2))
            sim = sim.masked_fill(~t_live.unsqueeze(1), float("-inf"))
            join = sim.argmax(-1)  # [B, N] target number
        else:
            join = torch.zeros(B, N, dtype=torch.long, device=dev)
        # slots: [CLS, dominant in order, contextual in target order]
        n_dom = dom.sum(1)
        head = is_cls | dom
        head_slot = torch.cumsum(head.long(), 1) - 1
        t_rank = torch.cumsum(target.long(), 1) - 1
        base = (has_cls + n_dom).unsqueeze(1)
        assign = torch.full((B, N), -1, dtype=torch.long, device=dev)
        assign = torch.where(head, head_slot, assign)
        assign = torch.where(target, base + t_rank, assign)
        assign = torch.where(others & (n_t > 0).unsqueeze(1), base + join, assign)
        n_out = has_cls + n_dom + n_t
        M = int(n_out.max().item())
        slot_valid = torch.arange(M, device=dev).unsqueeze(0) < n_out.unsqueeze(1)
        owner = head | target
        rep = torch.zeros(B, M + 1, dtype=torch.long, device=dev)
        pos = torch.arange(N, device=dev).expand(B, N)
        rep.scatter_(1, torch.where(owner, assign, torch.full_like(assign, M)), pos)
        rep = rep[:, :M]
        merged = tokens.merge(assign, rep, slot_valid)
        kept = tokens.gather(rep, None if bool(slot_valid.all()) else slot_valid)  # CLS and dominant: unchanged
        # a contextual token is its target plus the mean of its joiners (size and signals: merge rules)
        x = tokens.x
        joined = others & (n_t > 0).unsqueeze(1)
        slot = torch.where(joined, assign, torch.full_like(assign, M))
        total = torch.zeros(B, M + 1, x.shape[-1], dtype=x.dtype, device=dev)
        total.scatter_add_(1, slot.unsqueeze(-1).expand_as(x), x * joined.unsqueeze(-1).to(x.dtype))
        cnt = torch.zeros(B, M + 1, dtype=x.dtype, device=dev).scatter_add_(1, slot, joined.to(x.dtype))
        mean = total[:, :M] / cnt[:, :M].clamp_min(1).unsqueeze(-1)
        ctx = (torch.arange(M, device=dev).unsqueeze(0) >= base) & slot_valid

        def pick(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(ctx.view(B, M, *([1] * (a.dim() - 2))), a, b.to(a.dtype))

        return kept.replace(
            x=pick(kept.x + mean, kept.x),
            size=None if tokens.size is None and not bool(ctx.any()) else pick(merged.sizes, kept.sizes),
            signals={name: {l: pick(t, kept.signals[name][l]) for l, t in per.items()}
                     for name, per in merged.signals.items()},
        )
