"""GlobalCom²: the thumbnail commands how many tokens each LLaVA-NeXT crop keeps, and which.

Paper: "Global Compression Commander: Plug-and-Play Inference Acceleration for High-Resolution
Large Vision-Language Models" (Liu et al., AAAI 2026). Described in methods.md §4.

Score: ``s = signals["cls_logits"][layer]``, the head-mean PRE-softmax scaled CLS->patch logits of
the LAST CLIP layer (``layer=23``, not LLaVA's feature layer 22). Per image, with ``N = h*w``
(576), retention ``rho = ratio`` and temperature ``T``:

1. thumbnail: keep the top ``int(N*rho)`` tokens by ``s`` (144 of 576);
2. crop ratios: sum the thumbnail's logits over each crop's region (``S_r``);
   ``p = softmax((S - max S) / T)`` over the ``nH*nW`` crops; ``scale_r = rho*(1 + p_r - mean p)``,
   capped at 1 (no lower clip);
3. in crop ``r``, over the ``N_r`` tokens that survive LLaVA-NeXT's unpad: ``score = loc/||loc|| +
   glob/||glob||`` with ``loc`` the crop's own logits and ``glob`` the thumbnail's logits bilinearly
   upsampled (``align_corners=False``) to the whole unpadded crop grid and cut to the crop's
   rectangle; keep the top ``int(N_r * scale_r)``;
4. output: thumbnail tokens, then the crops' kept tokens in the raster order of the assembled grid.

Defaults (official code): ``ratio=0.25``, ``temperature=10``, ``layer=23``. Scores, scales and
the upsampling are computed in float64 (the official code runs in the model's fp16, so
``int(N_r*scale_r)`` can differ by one where a product lands on an integer). Ties rank the lower
position first. Stage ``vision`` (the official code selects after the projector; scores do not
depend on the features, so the choice is the same).

``compat="official"`` (default) reproduces the official code:

- thumbnail tokens are emitted in DESCENDING-score order, not re-sorted;
- crop regions are the official tiles: thumbnail token ``(i, j)`` belongs to crop
  ``(min(i // max(h//nH, 1), nH-1), min(j // max(w//nW, 1), nW-1))``;
- a newline after EVERY row of the ``nH*h``-row crop grid, rows removed by the unpad included
  (``newline_policy = "all_rows"``).

``compat="clean"``: thumbnail tokens in raster order; crop regions are geometric and unpad-aware
(thumbnail token ``(i, j)``'s centre is mapped onto the unpadded crop grid, as in ``hired``'s clean
mode; for LLaVA-NeXT's 24x24 grids without unpadding this equals the official tiles); standard
LLaVA-NeXT newlines (``newline_policy = "rows"``: one after each unpadded row that holds tokens).
Scores, scales and budgets are otherwise the official ones.

Single partition (LLaVA-1.5): the official single-image path is broken (``encode_images``
returns a tuple), so vtc applies step 1 alone: keep the top ``int(N*rho)`` tokens (at least 1) by
the logits, in descending-score order (official) or raster order (clean). An AnyRes image whose
budgets all round down to 0 (tiny grids only) keeps the thumbnail's top token.

As an allocator in a pipeline (``"globalcom2 | divprune"``) it only writes the per-partition
``budget`` (``int(N*rho)`` for the thumbnail, ``int(N_r*scale_r)`` per crop) and drops the crop
tokens the unpad removes; the next selector fills the budgets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vtc.errors import BudgetError, ConfigError
from vtc.ops.anyres import (
    DenseParts,
    at_least_one,
    dense_parts,
    dense_signal,
    drop_padding,
    emit,
    is_anyres,
    top_cells,
)
from vtc.ops.base import Allocator, OpConfig
from vtc.ops.selection import descending_order, keep_top
from vtc.registry import register
from vtc.taps.layers import Layer
from vtc.tokens import VisualTokens


@dataclass
class GlobalCom2Config(OpConfig):
    """``ratio``: retention ratio rho; ``temperature``: T of the crop softmax; ``layer``: CLIP layer of the logits."""

    ratio: float = 0.25
    temperature: float = 10.0
    layer: Layer = 23
    compat: Literal["official", "clean"] = "official"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 < self.ratio <= 1.0):
            raise BudgetError(f"globalcom2 ratio= (the retention ratio) must be in (0, 1], got {self.ratio}")
        if not self.temperature > 0:
            raise ConfigError(f"globalcom2 temperature= must be positive, got {self.temperature}")
        if self.compat not in ("official", "clean"):
            raise ConfigError(f"globalcom2 compat= must be 'official' or 'clean', got {self.compat!r}")


@register("globalcom2")
class GlobalCom2(Allocator):
    Config = GlobalCom2Config
    default_stage = "vision"

    @property
    def requires(self) -> dict[str, list[int]]:
        return {"cls_logits": [self.config.layer]}

    @property
    def newline_policy(self) -> str:
        """``"all_rows"`` (official: a newline on each of the nH*h grid rows, unpadded or not) or
        ``"rows"`` (clean: standard LLaVA-NeXT newlines)."""
        return "all_rows" if self.config.compat == "official" else "rows"

    # ------------------------------------------------------------------ scoring
    def _regions(self, dense: DenseParts) -> Tensor:
        """``[B, N]`` long: the crop whose region each thumbnail token belongs to."""
        h, w = dense.h, dense.w
        t = torch.arange(h * w)
        i, j = t // w, t % w
        out = torch.zeros(dense.pos.shape[0], h * w, dtype=torch.long)
        for b, g in enumerate(dense.grids):  # per-image geometry table
            if self.config.compat == "official":
                a = (i // max(h // g.nh, 1)).clamp_max(g.nh - 1)
                c = (j // max(w // g.nw, 1)).clamp_max(g.nw - 1)
            else:
                (r0, r1), (c0, c1) = g.rows, g.cols
                a = ((2 * h * r0 + (2 * i + 1) * (r1 - r0)) // (2 * h * h)).clamp(0, g.nh - 1)
                c = ((2 * w * c0 + (2 * j + 1) * (c1 - c0)) // (2 * w * w)).clamp(0, g.nw - 1)
            out[b] = a * g.nw + c
        return out.to(dense.pos.device)

    def _scales(self, s0: Tensor, dense: DenseParts) -> Tensor:
        """``[B, C]`` float64 crop retention ratios from the thumbnail logits ``s0`` ``[B, N]``."""
        cfg = self.config
        B, P, _ = dense.pos.shape
        C = P - 1
        crops = dense.exists[:, 1:]
        S = torch.zeros(B, C, dtype=torch.float64, device=s0.device).scatter_add_(1, self._regions(dense), s0)
        S = S.masked_fill(~crops, float("-inf"))
        p = torch.softmax((S - S.max(1, keepdim=True).values) / cfg.temperature, dim=1)
        mean = p.sum(1, keepdim=True) / crops.sum(1, keepdim=True)
        scale = (cfg.ratio * (1 + p - mean)).clamp_max(1.0)
        return scale.masked_fill(~crops, 0.0)

    def _global_map(self, s0: Tensor, dense: DenseParts) -> Tensor:
        """``[B, C, N]``: the thumbnail logits upsampled to each image's unpadded crop grid, per crop cell."""
        B, P, N = dense.pos.shape
        out = torch.zeros(B, P - 1, N, dtype=torch.float64, device=s0.device)
        for b, g in enumerate(dense.grids):  # each image has its own unpadded size
            hv, wv = g.valid_size()
            G = F.interpolate(s0[b].view(1, 1, dense.h, dense.w), size=(hv, wv), mode="bilinear",
                              align_corners=False).view(-1)
            gp, inside = dense.grid_pos[b, 1:1 + g.num_crops], dense.inside[b, 1:1 + g.num_crops]
            W = g.nw * dense.w
            at = (gp // W - g.rows[0]) * wv + (gp % W - g.cols[0])
            out[b, :g.num_crops] = torch.where(inside, G[at.clamp(0, hv * wv - 1)], torch.zeros_like(G[:1]))
        return out

    def _plan(self, tokens: VisualTokens, dense: DenseParts) -> tuple[Tensor, Tensor, Tensor]:
        """``(scores [B, P, N], budget [B, P], allowed [B, P, N])``."""
        s = dense_signal(tokens, dense, "cls_logits", self.config.layer, self.name)
        s0 = s[:, 0]
        N = dense.h * dense.w
        allowed = dense.inside & dense.present & dense.exists.unsqueeze(2)
        crop_allowed = allowed[:, 1:]
        n_valid = crop_allowed.sum(2)
        k = torch.floor(n_valid.to(torch.float64) * self._scales(s0, dense)).long()
        loc = s[:, 1:].masked_fill(~crop_allowed, 0.0)
        glob = self._global_map(s0, dense).masked_fill(~crop_allowed, 0.0)
        tiny = torch.finfo(torch.float64).tiny
        score = (loc / loc.norm(dim=2, keepdim=True).clamp_min(tiny)
                 + glob / glob.norm(dim=2, keepdim=True).clamp_min(tiny))
        k0 = torch.full((s.shape[0], 1), int(N * self.config.ratio), device=s.device)
        return torch.cat([s0.unsqueeze(1), score], 1), at_least_one(torch.cat([k0, k], 1)), allowed

    # ------------------------------------------------------------------ operator API
    def allocate(self, tokens: VisualTokens) -> VisualTokens:
        tokens.check_finite(f"operator {self.name!r}")
        if not is_anyres(tokens, self.name):
            return tokens.replace(budget=self._single_k(tokens).unsqueeze(1))
        dense = dense_parts(tokens, self.name)
        _, budget, _ = self._plan(tokens, dense)
        return drop_padding(tokens, dense).replace(budget=budget)

    def forward(self, tokens: VisualTokens) -> VisualTokens:
        tokens.check_finite(f"operator {self.name!r}")
        official = self.config.compat == "official"
        if not is_anyres(tokens, self.name):
            s = tokens.signal("cls_logits", self.config.layer, op=f"operator {self.name!r}").to(torch.float64)
            return keep_top(tokens, s, self._single_k(tokens), order="score" if official else "original"
                            ).replace(budget=None)
        dense = dense_parts(tokens, self.name)
        scores, budget, allowed = self._plan(tokens, dense)
        keep = top_cells(scores, allowed, budget)
        N = dense.h * dense.w
        B = tokens.batch_size
        if official:  # rank of each thumbnail cell in descending-score order
            order = descending_order(scores[:, 0])
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(B, N))
        else:
            rank = torch.arange(N, device=tokens.device).expand(B, N)
        return emit(tokens, dense, keep, rank)

    def _single_k(self, tokens: VisualTokens) -> Tensor:
        n = tokens.counts
        return torch.minimum((n.to(torch.float64) * self.config.ratio).floor().long().clamp_min(1), n)
