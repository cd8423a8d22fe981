"""ToMe: bipartite soft matching, size-weighted token merging, iterated to a budget.

Paper: "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023). Described in methods.md §6.

One step on ``n`` tokens: split them alternately into A (even positions) and B (odd positions);
score each A token's best B partner by cosine similarity of the matching metric (the recorded
``keys`` signal when present, else the features); the ``r`` A tokens with the highest best
similarity merge into their partners. Merging is size-weighted (``x' = Σ size·x / Σ size``,
``size' = Σ size``), so repeated steps average over original patches. Steps repeat until each
image (or partition, under a budget) holds ``keep`` tokens; each step merges at most half the
unprotected tokens (``r ≤ (n - protected) // 2``), or at most ``r=`` when given (``r`` alone,
without keep/ratio, is a single step merging ``r``).

Output order. ``compat="official"`` (default) is ToMe's: ``[unmerged A tokens by descending
best-similarity, then all B tokens in their order]`` after each step (unmerged A tokens are put
back in position order when ``protect_cls`` is set, as ToMe does with a class token).
``compat="clean"`` or ``restore_order=True`` sorts the final tokens by the smallest original index
each one contains, and that index becomes the token's ``index`` (in official order a merged token's
``index`` is its destination's, ToMe's representative). ``protect_cls=True`` keeps the first token (a CLS token) from ever being merged
away. ``metric``: ``"auto"`` (keys if recorded, else features), ``"keys"`` (required; the tap records
them at ``layer``, default ``"feature"``: the layer whose output the model uses) or ``"x"``; under
``"auto"`` with no ``layer`` the keys of the highest recorded layer are used. Merged ``keys``
follow the size-weighted mean, so later steps match on the merged metric (as AIM does for merging
outside a ViT).

Precision and ties: each step scores in the metric's dtype in ToMe's order of operations
(``m / ||m||``, ``A @ Bᵀ``, row max, ``argsort(descending=True)``); in ``compat="official"`` the
argsort is torch's default (unstable) one, so fp16/bf16 ties break as in the official code on the
same device; ``compat="clean"`` breaks ties to the lower position. Merged values are computed in at
least float32 (the official ``merge_wavg`` runs in the model's dtype). When every image holds all
its tokens (no mask, no partitions) the number merged per step is known on the host and the steps
run without a host sync.

Partitions: when tokens carry ``group`` (LLaVA-NeXT's base view and crops), a token merges with
tokens of its own partition; only once every partition is down to one token do merges cross
partitions (a budget below one token per partition). A merged token keeps its representative's
``index`` and ``group`` together. (ToMe itself knows no partitions; this is vtc's rule.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vtc.errors import BudgetError, SignalError
from vtc.ops.base import SelectConfig, Selector
from vtc.registry import register
from vtc.taps.layers import Layer, check_layer
from vtc.tokens import SIGNAL_MERGE_RULES, VisualTokens

#: the layer of the keys ``metric="keys"`` matches on when no ``layer`` is given
KEY_LAYER = "feature"
_FIRST = "_tome_first_index"  # private signal: smallest original index inside each token
SIGNAL_MERGE_RULES[_FIRST] = "min"


@dataclass
class ToMeConfig(SelectConfig):
    """See the module docstring for each argument."""

    r: int | None = None
    metric: Literal["auto", "keys", "x"] = "auto"
    layer: Layer | None = None
    protect_cls: bool = False
    compat: Literal["official", "clean"] = "official"
    restore_order: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None:
            check_layer(self.layer, "tome.layer")
        if self.r is not None and self.r <= 0:
            raise BudgetError(f"tome r= is the number of merges per step and must be positive, got {self.r}")


def bipartite_step(metric: Tensor, valid_count: Tensor, r: Tensor, protect: bool, group: Tensor | None = None,
                   stable: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One bipartite soft-matching step on left-packed rows.

    With ``group`` ``[B, N]``, an A token may only merge into a B token of the same partition, and
    ``r`` is capped per row at the number of A tokens that have such a partner; a row where no
    A token has one matches across partitions instead (so a budget below one token per partition
    can still be met).
    Returns ``assign [B, N]`` (output slot per position), ``rep [B, M]`` (representative position
    per slot), ``slot_valid [B, M]``, in ToMe's output order ``[unmerged A, B]``, and the ``r``
    actually merged per row.
    """
    B, N, _ = metric.shape
    dev = metric.device
    n = valid_count
    m = _unit(metric)
    a_pos = torch.arange(0, N, 2, device=dev)
    b_pos = torch.arange(1, N, 2, device=dev)
    Na, Nb = a_pos.numel(), b_pos.numel()
    a_valid = a_pos.unsqueeze(0) < n.unsqueeze(1)
    b_valid = b_pos.unsqueeze(0) < n.unsqueeze(1)
    neg = torch.finfo(m.dtype).min
    if Nb == 0:
        scores = torch.full((B, Na, 1), neg, dtype=m.dtype, device=dev)
    else:
        scores = m[:, a_pos] @ m[:, b_pos].transpose(1, 2)
        scores = scores.masked_fill(~b_valid.unsqueeze(1), float("-inf"))
    scores = scores.masked_fill(~a_valid.unsqueeze(2), float("-inf"))
    if protect:
        scores[:, 0, :] = float("-inf")
    if group is not None and Nb > 0:
        same = scores.masked_fill(group[:, a_pos].unsqueeze(2) != group[:, b_pos].unsqueeze(1), float("-inf"))
        has_pair = torch.isfinite(same).flatten(1).any(1)
        scores = torch.where(has_pair.view(B, 1, 1), same, scores)
    best, best_dst = scores.max(-1)
    r = torch.minimum(r, torch.isfinite(best).sum(1))
    order = torch.sort(best, dim=1, descending=True, stable=stable).indices  # [B, Na] A indices
    # padding A tokens last (an unstable sort may mix them with real ones whose best is -inf)
    order = order.gather(1, torch.sort((~a_valid).gather(1, order).to(torch.uint8), dim=1, stable=True).indices)
    inv = torch.empty_like(order).scatter_(1, order, torch.arange(Na, device=dev).expand(B, Na))
    nA = a_valid.sum(1)
    r_ = r.unsqueeze(1)
    is_src = (inv < r_) & a_valid
    is_unm = (inv >= r_) & a_valid
    n_unm = (nA - r).unsqueeze(1)
    if protect:
        slot_a = torch.cumsum(is_unm.long(), 1) - 1
    else:
        slot_a = inv - r_
    slot_a = torch.where(is_src, n_unm + best_dst.clamp_max(max(Nb - 1, 0)), slot_a)
    slot_a = torch.where(a_valid, slot_a, torch.full_like(slot_a, -1))
    slot_b = torch.where(b_valid, n_unm + torch.arange(Nb, device=dev).unsqueeze(0), torch.full((B, Nb), -1, device=dev, dtype=torch.long))
    assign = torch.full((B, N), -1, dtype=torch.long, device=dev)
    assign[:, a_pos] = slot_a
    assign[:, b_pos] = slot_b
    M = int((n - r).max().item())
    rep = torch.full((B, M + 1), 0, dtype=torch.long, device=dev)
    owners = assign >= 0
    owners[:, a_pos] &= is_unm  # merged A tokens are never a slot's representative
    pos = torch.arange(N, device=dev).expand(B, N)
    rep.scatter_(1, torch.where(owners, assign, torch.full_like(assign, M)), pos)
    rep = rep[:, :M]
    # rows with nothing to merge stay exactly as they are (ToMe's r <= 0 is the identity)
    idle = (r == 0).unsqueeze(1)
    valid = pos < n.unsqueeze(1)
    assign = torch.where(idle, torch.where(valid, pos, torch.full_like(pos, -1)), assign)
    rep = torch.where(idle, torch.arange(M, device=dev).expand(B, M).clamp_max(N - 1), rep)
    slot_valid = torch.arange(M, device=dev).unsqueeze(0) < (n - r).unsqueeze(1)
    return assign, rep, slot_valid, r


def _unit(metric: Tensor) -> Tensor:
    """``m / ||m||`` in the metric's dtype (a zero vector stays 0 where ToMe's division gives NaN)."""
    norm = metric.norm(dim=-1, keepdim=True)
    return metric / norm.masked_fill(norm == 0, 1)


def bipartite_fixed(metric: Tensor, r: int, protect: bool, stable: bool) -> tuple[Tensor, Tensor]:
    """One soft-matching step on complete rows (no padding, no partitions, ``0 < r <= Na``): the
    plain batched ToMe step. Returns ``assign [B, N]`` (output slot per position, ToMe's order
    ``[unmerged A, B]``) and ``rep [B, N - r]`` (each slot's representative position). No host sync."""
    B, N, _ = metric.shape
    dev = metric.device
    m = _unit(metric)
    a, b = m[:, 0::2], m[:, 1::2]
    Na, Nb = a.shape[1], b.shape[1]
    scores = a @ b.transpose(1, 2)
    if protect:
        scores[:, 0, :] = float("-inf")
    best, best_dst = scores.max(-1)
    order = torch.sort(best, dim=1, descending=True, stable=stable).indices  # [B, Na]
    n_unm = Na - r
    unm = order[:, r:]
    if protect:
        unm = unm.sort(dim=1).values
    ar = torch.arange(Na, device=dev)
    # output slot of each A token: its rank among the unmerged ones, or its partner's slot
    slot_unm = torch.empty_like(order).scatter_(1, unm, ar[:n_unm].expand(B, n_unm).contiguous())
    is_src = torch.zeros(B, Na, dtype=torch.bool, device=dev).scatter_(1, order[:, :r], True)
    slot_a = torch.where(is_src, best_dst + n_unm, slot_unm)
    assign = torch.empty(B, N, dtype=torch.long, device=dev)
    assign[:, 0::2] = slot_a
    assign[:, 1::2] = ar[:Nb] + n_unm
    rep = torch.cat([2 * unm, (2 * ar[:Nb] + 1).expand(B, Nb)], 1)
    return assign, rep


def track_first(tokens: VisualTokens) -> tuple[VisualTokens, int]:
    """``tokens`` with a private signal holding, through later merges, the first (smallest) original
    ``(index, group)`` inside each token, packed in one exact float64 with the partition count ``G``
    (returned); :func:`sort_by_first` reads it."""
    G = tokens.num_groups
    grp = tokens.group if tokens.group is not None else torch.zeros_like(tokens.index)
    first = tokens.index.to(torch.float64) * G + grp.to(torch.float64)
    return tokens.replace(signals={**tokens.signals, _FIRST: {0: first}}), G


def sort_by_first(tokens: VisualTokens, G: int) -> VisualTokens:
    """Merged tokens in raster order: sorted by the first original patch each contains, which becomes
    its ``index`` (and its partition its ``group``); drops the signal :func:`track_first` added."""
    first = tokens.signals[_FIRST][0]
    if tokens.mask is not None:
        first = first.masked_fill(~tokens.mask, float("inf"))
    tokens = tokens.gather(torch.sort(first, dim=1, stable=True).indices, tokens.mask)
    first = tokens.signals[_FIRST][0]
    if tokens.mask is not None:
        first = first.masked_fill(~tokens.mask, 0)
    first = first.long()
    return tokens.replace(index=first // G, group=None if tokens.group is None else first % G,
                          signals={s: v for s, v in tokens.signals.items() if s != _FIRST})


@register("tome")
class ToMe(Selector):
    Config = ToMeConfig
    default_stage = "vision"

    @property
    def requires(self) -> dict[str, list[int]]:
        if self.config.metric == "keys":
            return {"keys": [KEY_LAYER if self.config.layer is None else self.config.layer]}
        return {}

    int_budget = True

    def resolve_keep(self, counts: Tensor | int) -> Tensor | int:
        cfg = self.config
        if cfg.keep is None and cfg.ratio is None and cfg.r is not None:
            return max(counts - cfg.r, 1) if isinstance(counts, int) else (counts - cfg.r).clamp_min(1)
        return super().resolve_keep(counts)

    def _steps(self, n: int, k: int, protect: int, one_step: bool):
        """Host schedule of merges per step, from ``n`` to ``k`` tokens."""
        while n > k:
            r = min(n - k, (n - protect) // 2)
            if self.config.r is not None:
                r = min(r, self.config.r)
            if r <= 0:
                raise BudgetError(
                    f"tome cannot merge below {n} tokens with protect_cls=True "
                    f"(asked for {k}); raise keep or disable protect_cls"
                )
            yield r
            n -= r
            if one_step:
                return

    def select(self, tokens: VisualTokens, k: Tensor | int) -> VisualTokens:
        cfg = self.config
        protect = 1 if cfg.protect_cls else 0
        sort_back = cfg.restore_order or cfg.compat == "clean"
        G = 1
        if sort_back:
            tokens, G = track_first(tokens)
        key_layer = None
        if cfg.metric != "x" and tokens.signals.get("keys"):
            key_layer = cfg.layer if cfg.layer is not None else (
                KEY_LAYER if cfg.metric == "keys" else max(tokens.signals["keys"]))
            tokens.signal("keys", key_layer, op="operator 'tome'")  # SignalError if that layer is missing
        elif cfg.metric == "keys":
            raise SignalError(f"operator 'tome' with metric='keys' needs signal 'keys' at vision layer "
                              f"{KEY_LAYER if cfg.layer is None else cfg.layer!r}; record it with a tap")
        one_step = cfg.keep is None and cfg.ratio is None and cfg.r is not None and tokens.budget is None
        stable = cfg.compat == "clean"
        if isinstance(k, int) and tokens.group is None:  # complete rows: a host schedule, no sync
            for r in self._steps(tokens.num_tokens, k, protect, one_step):
                metric = tokens.x if key_layer is None else tokens.signal("keys", key_layer, op="operator 'tome'")
                tokens = tokens.merge(*bipartite_fixed(metric, r, bool(protect), stable), complete=True)
            return self._finish(tokens, G if sort_back else 0, None)
        if isinstance(k, int):
            k = torch.full((tokens.batch_size,), k, dtype=torch.long, device=tokens.device)
        drop_all = k == 0
        target = k.clamp_min(1)
        while True:
            n = tokens.counts
            room = (n - protect) // 2
            r = torch.minimum(n - target, room).clamp_min(0)
            if cfg.r is not None:
                r = r.clamp_max(cfg.r)
            if not bool((r > 0).any()):
                if bool((n > target).any()):
                    raise BudgetError(
                        f"tome cannot merge below {int(n[n > target].min())} tokens with protect_cls=True "
                        f"(asked for {int(target[n > target].min())}); raise keep or disable protect_cls"
                    )
                break
            metric = tokens.x if key_layer is None else tokens.signal("keys", key_layer, op="operator 'tome'")
            assign, rep, slot_valid, _ = bipartite_step(metric, n, r, bool(protect), tokens.group, stable)
            tokens = tokens.merge(assign, rep, None if bool(slot_valid.all()) else slot_valid)
            if one_step:
                break
        return self._finish(tokens, G if sort_back else 0, drop_all)

    def _finish(self, tokens: VisualTokens, G: int, drop_all: Tensor | None) -> VisualTokens:
        """Sort back to raster order when ``G`` (the partition count of the packed first-index
        signal; 0: keep ToMe's order), and empty the images whose budget was 0."""
        if G:
            tokens = sort_by_first(tokens, G)
        if drop_all is not None and bool(drop_all.any()):
            tokens = tokens.keep_mask((~drop_all).unsqueeze(1).expand(tokens.x.shape[:2]))
        return tokens
