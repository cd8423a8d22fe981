"""GlobalCom²: the thumbnail commands how many tokens each LLaVA-NeXT crop keeps, and which.

Paper: "Global Compression Commander: Plug-and-Play Inference Acceleration for High-Resolution
Large Vision-Language Models" (Liu et al., AAAI 2026). Described in methods.md §4.

Score: ``s = signals["cls_logits"][layer]``, the head-mean PRE-softmax scaled CLS->patch logits of
the LAST tower layer (``layer="last"``: 23 of CLIP-L's 24, not LLaVA's feature layer 22). Per image, with ``N = h*w``
(576), retention ``rho = ratio`` and temperature ``T``:

1. thumbnail: keep the top ``int(N*rho)`` tokens by ``s`` (144 of 576);
2. crop ratios: sum the thumbnail's logits over each crop's region (``S_r``);
   ``p = softmax((S - max S) / T)`` over the ``nH*nW`` crops; ``scale_r = rho*(1 + p_r - mean p)``,
   capped at 1 (no lower clip);
3. in crop ``r``, over the ``N_r`` tokens that survive LLaVA-NeXT's unpad: ``score = loc/||loc|| +
   glob/||glob||`` with ``loc`` the crop's own logits and ``glob`` the thumbnail's logits bilinearly
   upsampled (``align_corners=False``) to the whole unpadded crop grid and cut to the crop's
   rectangle; keep the top ``int(N_r * scale_r)``;
4. output: thumbnail tokens, then the crops' kept tokens in the raster order of the assembled grid (where
   official places them, see below).

Defaults (official code): ``ratio=0.25``, ``temperature=10``, ``layer="last"``. The crop scores,
scales and the upsampling are computed in float64 (the official code runs in the model's fp16, so
in half precision a crop's boundary tokens and ``int(N_r*scale_r)`` can differ by one where a
product lands on an integer); ties there rank the lower position first. The thumbnail is ranked
in ``compat="official"`` exactly as the official code ranks it: ``torch.argsort(s, descending=True)``
on the logits in their own dtype, so fp16/bf16 ties break as in the official run on the same device
(``compat="clean"``: ties to the lower position). Stage ``vision`` (the official code selects after
the projector; scores do not depend on the features, so the choice is the same).

``compat="official"`` (default) reproduces the official code:

- thumbnail tokens are emitted in DESCENDING-score order, not re-sorted;
- crop regions are the official tiles: thumbnail token ``(i, j)`` belongs to crop
  ``(min(i // max(h//nH, 1), nH-1), min(j // max(w//nW, 1), nW-1))``;
- a newline after EVERY row of the ``nH*h``-row crop grid, rows removed by the unpad included
  (``newline_policy = "all_rows"``);
- kept crop tokens are placed by rank, an official bug: the official code lists a crop's unpadded
  tokens, ranks them, and writes the ``k``-th kept token into cell ``i`` of an empty ``h x w`` crop,
  ``i`` being the token's number in that list rather than its own cell; the crop grid is not
  unpadded again (:class:`~vtc.geometry.CropRules` ``rank_placement``). A crop without padding is
  unaffected; in a crop with padding the kept tokens move up (or left) towards the crop's corner, so
  their order and the newlines between them differ from the image's layout (the kept set and the
  counts are the same);
- the unpad arithmetic is original LLaVA's float64 truncation (``unpad_rounding="float64"``; about
  1 in 10^4 image sizes keeps another row or column than current transformers).

``compat="clean"``: thumbnail tokens in raster order; crop regions are geometric and unpad-aware
(thumbnail token ``(i, j)``'s centre is mapped onto the unpadded crop grid, as in ``hired``'s clean
mode; for LLaVA-NeXT's 24x24 grids without unpadding this equals the official tiles); standard
LLaVA-NeXT newlines (``newline_policy = "rows"``: one after each unpadded row that holds tokens);
kept crop tokens at their own cells; transformers' unpad arithmetic. Scores, scales and budgets are
otherwise the official ones.

``unpad_rounding=`` (``"transformers"``, ``"float32"``, ``"float64"``; default: the mode's, as above)
sets the unpad arithmetic alone. The operator declares its :attr:`crop_rules`; ``vtc.apply``
unpads and assembles the image with the same rules (see :mod:`vtc.integrations.options`). An
image so thin that the unpad leaves no crop row or column (a 400x4 photo) keeps only thumbnail
tokens, as stock LLaVA-NeXT sends none of its crop tokens (the official code fails there).

Single partition (LLaVA-1.5): the official single-image path is broken (``encode_images``
returns a tuple), so vtc applies step 1 alone: keep the top ``int(N*rho)`` tokens (at least 1) by
the logits, in descending-score order (official) or raster order (clean). An AnyRes image whose
budgets all round down to 0 (tiny grids only) keeps the thumbnail's top token.

As an allocator in a pipeline (``"globalcom2 | divprune"``) it only writes the per-partition
``budget`` (``int(N*rho)`` for the thumbnail, ``int(N_r*scale_r)`` per crop) and drops the crop
tokens the unpad removes; the next selector fills the budgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vtc.errors import BudgetError, ConfigError
from vtc.geometry import UNPAD_ROUNDINGS, CropRules, drop_padding
from vtc.ops.anyres import (
    DenseParts,
    at_least_one,
    dense_parts,
    dense_signal,
    emit,
    is_anyres,
    top_cells,
)
from vtc.ops.base import Allocator, OpConfig
from vtc.ops.selection import keep_top
from vtc.registry import register
from vtc.taps.layers import Layer, check_layer
from vtc.tokens import VisualTokens


@dataclass
class GlobalCom2Config(OpConfig):
    """``ratio``: retention ratio rho; ``temperature``: T of the crop softmax; ``layer``: CLIP layer of the logits."""

    ratio: float = 0.25
    temperature: float = 10.0
    layer: Layer = "last"
    compat: Literal["official", "clean"] = "official"
    unpad_rounding: Literal["transformers", "float32", "float64"] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 < self.ratio <= 1.0):
            raise BudgetError(f"globalcom2 ratio= (the retention ratio) must be in (0, 1], got {self.ratio}")
        check_layer(self.layer, "globalcom2.layer")
        if not self.temperature > 0:
            raise ConfigError(f"globalcom2 temperature= must be positive, got {self.temperature}")
        if self.compat not in ("official", "clean"):
            raise ConfigError(f"globalcom2 compat= must be 'official' or 'clean', got {self.compat!r}")
        if self.unpad_rounding is not None and self.unpad_rounding not in UNPAD_ROUNDINGS:
            raise ConfigError(
                f"globalcom2 unpad_rounding= must be one of {UNPAD_ROUNDINGS}, got {self.unpad_rounding!r}")


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

    @property
    def crop_rules(self) -> CropRules:
        """Official: rank placement and float64 unpad; clean: transformers' (see the module docstring)."""
        official = self.config.compat == "official"
        rounding = self.config.unpad_rounding or ("float64" if official else "transformers")
        return CropRules(rounding=rounding, rank_placement=official)

    # ------------------------------------------------------------------ scoring
    def _regions(self, dense: DenseParts) -> Tensor:
        """``[B, N]`` long: the crop whose region each thumbnail token belongs to."""
        h, w = dense.h, dense.w
        t = torch.arange(h * w, device=dense.pos.device).unsqueeze(0)
        i, j = t // w, t % w
        if self.config.compat == "official":
            a = torch.minimum(i // (h // dense.nh).clamp_min(1), dense.nh - 1)
            c = torch.minimum(j // (w // dense.nw).clamp_min(1), dense.nw - 1)
        else:
            a = torch.minimum((2 * h * dense.r0 + (2 * i + 1) * (dense.r1 - dense.r0)) // (2 * h * h), dense.nh - 1)
            c = torch.minimum((2 * w * dense.c0 + (2 * j + 1) * (dense.c1 - dense.c0)) // (2 * w * w), dense.nw - 1)
            a, c = a.clamp_min(0), c.clamp_min(0)
        return a * dense.nw + c

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
        """``[B, C, N]``: the thumbnail logits ``s0`` ``[B, h*w]`` upsampled bilinearly
        (``align_corners=False``, as ``F.interpolate``) to each image's unpadded crop grid, read at
        each crop cell (0 outside the unpadded area). All images at once, each with its own size."""
        B, P, N = dense.pos.shape
        h, w = dense.h, dense.w
        # [B, 1, 1]; an image without unpadded rows (or columns) has no cell to read this at
        hv, wv = (dense.r1 - dense.r0).clamp_min(1).unsqueeze(2), (dense.c1 - dense.c0).clamp_min(1).unsqueeze(2)
        gp = dense.grid_pos[:, 1:]
        W = (dense.tw * w).unsqueeze(2)
        y = (gp // W - dense.r0.unsqueeze(2)).clamp_min(0)
        x = (gp % W - dense.c0.unsqueeze(2)).clamp_min(0)

        def source(d: Tensor, n_in: int, n_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            src = ((n_in / n_out.to(torch.float64)) * (d.to(torch.float64) + 0.5) - 0.5).clamp_min(0)
            i0 = src.long().clamp_max(n_in - 1)
            return i0, (i0 + 1).clamp_max(n_in - 1), src - i0

        y0, y1, ly = source(y, h, hv)
        x0, x1, lx = source(x, w, wv)
        flat = s0.reshape(B, 1, h * w).expand(B, P - 1, h * w)

        def at(yy: Tensor, xx: Tensor) -> Tensor:
            return flat.gather(2, yy * w + xx)

        G = ((1 - ly) * ((1 - lx) * at(y0, x0) + lx * at(y0, x1))
             + ly * ((1 - lx) * at(y1, x0) + lx * at(y1, x1)))
        return G.masked_fill(~dense.inside[:, 1:], 0.0)

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
        tokens.check_finite(f"operator {self.name!r}", self.requires)
        if not is_anyres(tokens, self.name):
            k = self._single_k(tokens)
            if isinstance(k, int):
                k = torch.full((tokens.batch_size,), k, dtype=torch.long, device=tokens.device)
            return tokens.replace(budget=k.unsqueeze(1))
        dense = dense_parts(tokens, self.name, self.crop_rules)
        _, budget, _ = self._plan(tokens, dense)
        return drop_padding(tokens, self.crop_rules).replace(budget=budget)

    def forward(self, tokens: VisualTokens) -> VisualTokens:
        official = self.config.compat == "official"
        if not is_anyres(tokens, self.name):
            s = tokens.signal("cls_logits", self.config.layer, op=f"operator {self.name!r}")
            k = self._single_k(tokens)
            if isinstance(k, int):  # official: torch's argsort(descending) on the logits as they are
                return keep_top(tokens, s, k, order="score" if official else "original",
                                stable=not official).replace(budget=None)
            return keep_top(tokens, s.to(torch.float64), k, order="score" if official else "original"
                            ).replace(budget=None)
        dense = dense_parts(tokens, self.name, self.crop_rules)
        scores, budget, allowed = self._plan(tokens, dense)
        keep = top_cells(scores, allowed, budget)
        N = dense.h * dense.w
        B = tokens.batch_size
        if official:
            # the thumbnail: torch's argsort(descending) of its logits in their own dtype, as the
            # official code (same order, ties included, on the same device); emitted in that order
            s0 = dense.scatter(tokens.signal("cls_logits", self.config.layer, op=f"operator {self.name!r}"))[:, 0]
            order = torch.argsort(s0, dim=1, descending=True)
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(B, N))
            keep[:, 0] = rank < budget[:, :1]
        else:
            rank = torch.arange(N, device=tokens.device).expand(B, N)
        return emit(tokens, dense, keep, rank)

    def _single_k(self, tokens: VisualTokens) -> Tensor | int:
        """Budget of a single-partition image: a host int when no image has padding, else ``[B]``."""
        if tokens.mask is None:
            n = tokens.num_tokens
            return min(max(math.floor(n * self.config.ratio), 1), n)
        n = tokens.counts
        return torch.minimum((n.to(torch.float64) * self.config.ratio).floor().long().clamp_min(1), n)
