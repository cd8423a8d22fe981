"""HiRED: split a token budget across LLaVA-NeXT's AnyRes partitions by early-layer CLS attention.

Paper: "HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution
Vision-Language Models" (Arif et al., AAAI 2025). Described in methods.md §3.

Per image with ``P = 1 + nH*nW`` partitions of ``N = h*w`` patches (LLaVA-NeXT: N = 576):
``B_tot = int(P*N*ratio)`` (or ``keep``); the base view (thumbnail) gets
``B_full = min(int(B_tot*alpha), N)`` tokens, its top ``B_full`` by the layer-``bottom_layer``
CLS attention; the crops share ``B_sub = min(B_tot - B_full, (P-1)*N)`` in proportion to how many
of the thumbnail's top ``spatial_k`` layer-``top_layer`` CLS-attention tokens fall in each crop's
region, and each crop keeps its own top tokens by its layer-``bottom_layer`` CLS attention.
Scores are ``signals["cls_attn"]`` (post-softmax, head-mean); the official code sums the 16 heads,
which is 16 x the head-mean, so every ranking is the same. Stage ``vision``.

Defaults (official scripts): ``ratio=0.2``, ``alpha=0.5``, ``top_layer=0`` (the first tower layer),
``bottom_layer="feature"`` (the layer whose output the model uses: 22 on LLaVA's CLIP-L; layer
forms: :mod:`vtc.taps.layers`). ``ratio=1`` disables the method (every
token that survives the unpad is kept).

``compat="official"`` (default) reproduces the official code:

- crop regions are raster CHUNKS of the thumbnail: thumbnail token ``t`` counts for crop
  ``t*C // N`` (C = nH*nW; the official ``reshape(nH, nW, N // C)``, so for 2x2 crop (0,0) gets
  thumbnail rows 0-5, not the top-left quadrant); vtc also accepts ``N`` not divisible by ``C``,
  where the official reshape fails;
- crop budgets are floored, ``b_i = int(cnt_i / sum(cnt) * B_sub)`` in float32, capped at N (up to
  C-1 tokens of the budget stay unused);
- ``alpha`` is used twice: ``spatial_k`` defaults to ``int(N*(1-alpha))``;
- each crop ranks all N of its tokens, padding included; tokens that LLaVA-NeXT's unpad removes
  are then dropped, so the total can be below ``B_tot``;
- no newline tokens (``newline_policy = "none"``); the thumbnail's kept tokens come first in
  raster order, then the crops' in the raster order of the assembled crop grid;
- the crop grid is assembled as the fork's transformers (before 4.41) assembles it, an official bug:
  it unpacks the ``(nH, nW)`` grid shape as ``(width, height)``, so the ``nH x nW`` crops (row-major)
  are tiled on an ``nW x nH`` grid, which is then unpadded to the image's aspect ratio and emitted
  row-major (:class:`~vtc.geometry.CropRules` ``transposed``). Square grids (2x2) are unaffected; on
  a non-square grid the unpad cuts the wrong rows: a 336x672 image (1x2 crops, no padding) is
  assembled as a 48x24 grid of which 12 rows survive, so at ``ratio=0.2`` about 217 tokens reach
  the language model instead of 344 (172 of them the thumbnail's);
- the unpad arithmetic is the fork's float32 (``unpad_rounding="float32"``: ``image_sizes`` is a
  LongTensor there, so ``int(orig_h * W / orig_w)`` runs in float32; about 1 in 10^4 sizes keeps
  another row or column than current transformers).

``compat="clean"``:

- crop regions are geometric and unpad-aware: thumbnail token ``(i, j)``'s centre is mapped onto
  the unpadded part of the crop grid (the thumbnail shows the whole image, squashed; the crops a
  padded resize) and counts for the crop it lands in;
- crop budgets are apportioned by largest remainder (they sum to ``B_sub`` exactly) and capped at
  each crop's unpadded token count, with ``B_sub = min(B_tot - B_full, unpadded crop tokens)``;
- ``spatial_k`` defaults to ``N // 2`` (288 for 576: the official value at ``alpha=0.5``), so
  ``alpha`` only sets the thumbnail share;
- crops rank only the tokens that survive the unpad, so the whole budget reaches the LM;
- standard LLaVA-NeXT newlines (``newline_policy = "rows"``: one after each unpadded row that holds tokens);
- the crop grid tiled and unpadded as current transformers does (``unpad_rounding="transformers"``).

``unpad_rounding=`` (``"transformers"``, ``"float32"``, ``"float64"``; default: the mode's, as above)
sets the unpad arithmetic alone. The operator declares its :attr:`crop_rules`; ``vtc.apply``
unpads and assembles the image with the same rules (see :mod:`vtc.integrations.options`).

An image so thin that the unpad leaves no crop row or column (a 400x4 photo) keeps only thumbnail
tokens, as stock LLaVA-NeXT sends none of its crop tokens.

Guards (both modes; the official code crashes, divides by zero or returns no token): when no
spatial token is counted (``alpha=1`` or ``spatial_k=0``), ``B_sub`` is split equally (floored in
official mode); crops whose budget is 0 keep nothing; an image never loses every token: when all
its budgets round down to 0 (a budget below the number of partitions) or every pick falls in
padding, it keeps the thumbnail's top token.

Single partition (LLaVA-1.5, the official ``modeling_llava.py`` variant): keep the top
``min(N, int(N*ratio))`` (or ``keep``; at least 1) tokens by layer-``bottom_layer`` CLS attention,
in raster order; ``alpha`` and ``top_layer`` are unused.

As an allocator in a pipeline (``"hired:ratio=0.2 | divprune"``) HiRED only writes the
per-partition ``budget`` (and drops the crop tokens the unpad removes, capping each crop's budget
at what is left); the next selector fills the budgets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vtc.errors import BudgetError, ConfigError, LayoutError
from vtc.geometry import UNPAD_ROUNDINGS, CropRules, drop_padding
from vtc.ops.anyres import (
    DenseParts,
    at_least_one,
    dense_parts,
    dense_signal,
    emit,
    is_anyres,
    keep_base_top1_if_empty,
    top_cells,
)
from vtc.ops.base import Allocator, OpConfig
from vtc.ops.budgets import apportion
from vtc.ops.selection import descending_order, keep_top, rank_mask
from vtc.registry import register
from vtc.taps.layers import Layer, check_layer, sorted_layers
from vtc.tokens import VisualTokens, checking_structure

DEFAULT_RATIO = 0.2


@dataclass
class HiredConfig(OpConfig):
    """See the module docstring. ``ratio`` defaults to 0.2 when ``keep`` is not given."""

    ratio: float | None = None
    keep: int | None = None
    alpha: float = 0.5
    top_layer: Layer = 0
    bottom_layer: Layer = "feature"
    spatial_k: int | None = None
    compat: Literal["official", "clean"] = "official"
    unpad_rounding: Literal["transformers", "float32", "float64"] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep is not None and self.ratio is not None:
            raise BudgetError(f"hired takes keep= or ratio=, not both (got keep={self.keep}, ratio={self.ratio})")
        if self.keep is not None and self.keep <= 0:
            raise BudgetError(f"hired keep= is the total tokens per image and must be positive, got {self.keep}")
        if self.ratio is not None and not (0.0 < self.ratio <= 1.0):
            raise BudgetError(f"hired ratio= must be in (0, 1], got {self.ratio}")
        check_layer(self.top_layer, "hired.top_layer")
        check_layer(self.bottom_layer, "hired.bottom_layer")
        if not (0.0 <= self.alpha <= 1.0):
            raise ConfigError(f"hired alpha= (the thumbnail's share of the budget) must be in [0, 1], got {self.alpha}")
        if self.spatial_k is not None and self.spatial_k < 0:
            raise ConfigError(f"hired spatial_k= must be >= 0, got {self.spatial_k}")
        if self.compat not in ("official", "clean"):
            raise ConfigError(f"hired compat= must be 'official' or 'clean', got {self.compat!r}")
        if self.unpad_rounding is not None and self.unpad_rounding not in UNPAD_ROUNDINGS:
            raise ConfigError(f"hired unpad_rounding= must be one of {UNPAD_ROUNDINGS}, got {self.unpad_rounding!r}")


@register("hired")
class HiRED(Allocator):
    Config = HiredConfig
    default_stage = "vision"
    default_ratio = DEFAULT_RATIO  # the budget when neither keep= nor ratio= is given

    @property
    def requires(self) -> dict[str, list[int]]:
        return {"cls_attn": sorted_layers({self.config.top_layer, self.config.bottom_layer})}

    @property
    def newline_policy(self) -> str:
        """``"none"`` (official: HiRED emits no newline tokens) or ``"rows"`` (clean: standard LLaVA-NeXT)."""
        return "none" if self.config.compat == "official" else "rows"

    @property
    def sees_padding(self) -> bool:
        """Official HiRED ranks every crop token, padding included; clean HiRED never keeps padding."""
        return self.config.compat == "official"

    @property
    def crop_rules(self) -> CropRules:
        """Official: the fork's transposed tiling and float32 unpad; clean: transformers' (see the module docstring)."""
        official = self.config.compat == "official"
        rounding = self.config.unpad_rounding or ("float32" if official else "transformers")
        return CropRules(rounding=rounding, transposed=official)

    # ------------------------------------------------------------------ budgets
    def _total(self, n: int) -> int:
        cfg = self.config
        if cfg.keep is not None:
            return cfg.keep
        return int(n * (self.default_ratio if cfg.ratio is None else cfg.ratio))

    def _disabled(self) -> bool:
        return self.config.keep is None and self.config.ratio == 1.0

    def _crop_regions(self, dense: DenseParts) -> Tensor:
        """``[B, N]`` long: the crop each thumbnail token counts for (compat-dependent, see docstring)."""
        h, w = dense.h, dense.w
        N = h * w
        t = torch.arange(N, device=dense.pos.device).unsqueeze(0)
        if self.config.compat == "official":
            return t * (dense.nh * dense.nw) // N
        i, j = t // w, t % w
        # centre of thumbnail cell (i, j) on the unpadded crop grid, in exact integers
        a = torch.minimum((2 * h * dense.r0 + (2 * i + 1) * (dense.r1 - dense.r0)) // (2 * h * h), dense.nh - 1)
        c = torch.minimum((2 * w * dense.c0 + (2 * j + 1) * (dense.c1 - dense.c0)) // (2 * w * w), dense.nw - 1)
        return a.clamp_min(0) * dense.nw + c.clamp_min(0)

    def _budgets(self, tokens: VisualTokens, dense: DenseParts) -> Tensor:
        """``[B, P]`` long budgets (before dropping unpadded tokens)."""
        cfg = self.config
        B, P, N = dense.pos.shape
        dev = dense.pos.device
        parts = [1 + g.num_crops for g in dense.grids]
        inside_crops = (dense.inside & dense.exists.unsqueeze(2))[:, 1:].sum(2)  # [B, P-1]
        if self._disabled():
            return torch.cat([torch.full((B, 1), N, device=dev), inside_crops], 1)
        alpha = cfg.alpha
        b_tot = [self._total(p * N) for p in parts]
        b_full = [min(int(bt * alpha), N) for bt in b_tot]
        if cfg.compat == "official":
            b_sub = [min(bt - bf, (p - 1) * N) for bt, bf, p in zip(b_tot, b_full, parts)]
            k_sp = int(N * (1 - alpha)) if cfg.spatial_k is None else cfg.spatial_k
            b_sub_t = torch.tensor(b_sub, device=dev)
        else:
            rest = torch.tensor([bt - bf for bt, bf in zip(b_tot, b_full)], device=dev)
            b_sub_t = torch.minimum(rest, inside_crops.sum(1))
            k_sp = N // 2 if cfg.spatial_k is None else cfg.spatial_k
        k_sp = min(k_sp, N)
        crops_exist = dense.exists[:, 1:]
        C = P - 1
        # spatial counts: top-k_sp thumbnail tokens by the top layer's CLS attention, per crop region
        c_top = dense_signal(tokens, dense, "cls_attn", cfg.top_layer, self.name)[:, 0]
        marked = rank_mask(descending_order(c_top), torch.full((B,), k_sp, device=dev))
        region = self._crop_regions(dense)
        cnt = torch.zeros(B, C, dtype=torch.long, device=dev).scatter_add_(1, region, marked.long())
        total = cnt.sum(1, keepdim=True)
        if cfg.compat == "official":
            f32 = torch.float32  # the official `cnt / cnt.sum() * B_sub` runs in float32, then `.int()`
            share = (cnt.to(f32) / total.clamp_min(1).to(f32) * b_sub_t.unsqueeze(1).to(f32)).int().long()
            even = (b_sub_t // crops_exist.sum(1)).unsqueeze(1).expand(B, C)
            crop_b = torch.where(total > 0, share, even).clamp_max(N)
        else:
            crop_b = apportion(cnt, b_sub_t, inside_crops)
        crop_b = torch.where(crops_exist & (b_sub_t > 0).unsqueeze(1), crop_b, torch.zeros_like(crop_b))
        return at_least_one(torch.cat([torch.tensor(b_full, device=dev).unsqueeze(1), crop_b], 1))

    # ------------------------------------------------------------------ operator API
    def allocate(self, tokens: VisualTokens) -> VisualTokens:
        tokens.check_finite(f"operator {self.name!r}", self.requires)
        if not is_anyres(tokens, self.name):
            k = self._single_k(tokens)
            if isinstance(k, int):
                k = torch.full((tokens.batch_size,), k, dtype=torch.long, device=tokens.device)
            return tokens.replace(budget=k.unsqueeze(1))
        self.check_signals(tokens)
        dense = dense_parts(tokens, self.name, self.crop_rules)
        budget = self._budgets(tokens, dense)
        left = (dense.inside & dense.present).sum(2)
        out = drop_padding(tokens, self.crop_rules)
        return out.replace(budget=at_least_one(torch.minimum(budget, left)))

    def forward(self, tokens: VisualTokens) -> VisualTokens:
        if not is_anyres(tokens, self.name):
            scores = tokens.signal("cls_attn", self.config.bottom_layer, op=f"operator {self.name!r}")
            k = self._single_k(tokens)
            if isinstance(k, int) and k >= tokens.num_tokens:
                return tokens.replace(budget=None)
            return keep_top(tokens, scores, k).replace(budget=None)
        self.check_signals(tokens)
        dense = dense_parts(tokens, self.name, self.crop_rules)
        budget = self._budgets(tokens, dense)
        c_bot = dense_signal(tokens, dense, "cls_attn", self.config.bottom_layer, self.name)
        if self.config.compat == "official":
            crops_full = (dense.present | ~dense.exists.unsqueeze(2))[:, 1:].all()
            if checking_structure() and not self._disabled() and not bool(crops_full):
                raise LayoutError(
                    "hired compat='official' ranks every crop token, padding included (the unpad then drops "
                    "those); the crops' padding tokens are missing here: pass the full crops or use compat='clean'"
                )
            allowed = dense.present.clone()
        else:
            allowed = dense.present & dense.inside
        allowed &= dense.exists.unsqueeze(2)
        if self._disabled():  # ratio=1: the method is off, every token the unpad leaves is kept
            keep = allowed & dense.inside
        else:
            keep = keep_base_top1_if_empty(top_cells(c_bot, allowed, budget) & dense.inside, c_bot[:, 0])
        raster = torch.arange(dense.h * dense.w, device=tokens.device).expand(tokens.batch_size, -1)
        return emit(tokens, dense, keep, raster)

    def _single_k(self, tokens: VisualTokens) -> Tensor | int:
        """Budget of a single-partition image: a host int when no image has padding, else ``[B]``."""
        def k_of(c: int) -> int:
            return c if self._disabled() else min(max(self._total(c), 1), c)

        if tokens.mask is None:
            return k_of(tokens.num_tokens)
        return torch.tensor([k_of(int(c)) for c in tokens.counts.tolist()], device=tokens.device)
