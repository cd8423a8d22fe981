"""SparseVLM (v1): text-guided pruning of visual tokens inside the LLM, with token recycling.

Paper: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference"
(Zhang et al., ICML 2025). vtc implements the v1 method (the official repository's default mode).

1. Raters, chosen once at the operator's first layer from the LLM's input embeddings
   (``ctx.embeds``): with ``V`` the visual and ``T`` the text embeddings after the image,
   ``s = mean over visual of softmax over text (V Tᵀ)``; the raters are the text tokens with
   ``s > mean(s)`` (no rater: every text token after the image; no text after the image: the last
   prompt token -- guards, the official code assumes a question after the image). They are kept for
   the later layers in ``ctx.state`` (text is never dropped, so they stay the same tokens).
2. After each layer in ``layers``, each alive visual token's score is the mean over raters of the
   head-mean softmax attention from the rater's query to it (recomputed from q/k, causal); the top
   ``n_l`` stay.
3. Recycling: of the ``p`` dropped tokens, the ``int(0.3 * p) + 1`` with the highest scores are
   clustered into ``int(m / 10) + 1`` groups (``m`` recycled) by DPC-kNN on their hidden states
   (distances ``||x_i - x_j|| / sqrt(D)``; density ``exp(-mean of the squared distances to the k
   nearest, self included)``, ``k`` = the number of clusters; each token's distance to the nearest
   denser token, the largest distance for the densest; centres = top ``dist * density``; every
   token joins its nearest centre) and each cluster's plain mean is inserted right after the kept
   visual tokens, as a new visual token (a :class:`~vtc.ops.llm_layer.LayerUpdate`).

Defaults: ``layers=[2, 6, 15]`` (0-based, after running the layer; 32-layer models, scaled as
``int(l * T / 32)`` otherwise) and ``retain=192``, whose per-layer counts are the official ones for
576 input tokens: 192 -> [300, 200, 110], 128 -> [303, 110, 36], 96 -> [238, 48, 26],
64 -> [66, 30, 17]; for another input count ``n_in`` they scale as ``count * n_in // 576``.
``counts=[...]`` gives absolute counts instead. Position ids: ``"contiguous"`` (v1 truncates
``position_ids`` to the new length; the recycled tokens take the next ids). On a model whose ids cannot be
renumbered (Qwen VL's 3-D M-RoPE ids) the integration keeps the original ids instead, unless
``position_ids="contiguous"`` is asked for explicitly, which is then refused.

Official quirks and differences: the official DPC-kNN (from the token-clustering code it reuses)
may add tiny random noise to the densities to break ties; vtc breaks ties by order (the recycled
tokens in descending score order), so it is deterministic. The paper's "equivalent 192 tokens"
is reproduced by the layer-average count only if each listed layer already runs on the pruned
set (layer ``l`` itself pruned); with "after layer l" (vtc's convention and methods' reading of
the code) the 192 setting averages about 206 visual tokens over 32 layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtc.errors import ConfigError, InputError
from vtc.ops.llm_layer import (
    LayerConfig,
    LayerContext,
    LayerOperator,
    LayerUpdate,
    floor_count,
    keep_top_visual,
    scaled_layers,
    text_after_visual,
)
from vtc.ops.selection import descending_order
from vtc.registry import register

_REF_LAYERS, _REF_DEPTH, _REF_TOKENS = [2, 6, 15], 32, 576
#: official v1 per-layer visual token counts for LLaVA-1.5's 576 tokens
RETAIN: dict[int, tuple[int, int, int]] = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26),
                                          64: (66, 30, 17)}
RECYCLE_FRACTION = 0.3


@dataclass
class SparseVLMConfig(LayerConfig):
    """``retain``: an official budget preset; ``counts``: absolute visual tokens kept after each layer;
    ``recycle``: cluster part of the dropped tokens back in (v1)."""

    retain: int = 192
    counts: list[int] | None = None
    recycle: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retain not in RETAIN:
            raise ConfigError(f"sparsevlm retain= is one of the official presets {sorted(RETAIN)}, got {self.retain}; "
                              "give counts= for other budgets")
        if self.counts is not None:
            if not self.counts or any(c < 0 for c in self.counts):
                raise ConfigError(f"sparsevlm counts are visual tokens kept per layer (>= 0), got {self.counts}")
            if self.layers is not None and len(self.layers) != len(self.counts):
                raise ConfigError(f"sparsevlm needs one count per layer: layers={self.layers}, counts={self.counts}")
        elif self.layers is not None and len(self.layers) != 3:
            raise ConfigError(f"sparsevlm's retain presets have three layers; give counts= for layers={self.layers}")


@register("sparsevlm")
class SparseVLM(LayerOperator):
    Config = SparseVLMConfig
    default_position_ids = "contiguous"
    #: the integration must fill LayerContext.embeds (the LLM input embeddings of the current positions)
    needs_embeds = True

    def default_layers(self, num_layers: int) -> list[int]:
        n = len(self.config.counts) if self.config.counts is not None else 3
        if n != 3:
            raise ConfigError(f"sparsevlm with {n} counts needs layers= (one per count)")
        layers = scaled_layers(_REF_LAYERS, _REF_DEPTH, num_layers)
        if len(set(layers)) != len(layers):
            raise ConfigError(f"sparsevlm cannot scale layers {_REF_LAYERS} to a {num_layers}-layer model; give layers=")
        return layers

    def _position(self, layer: int, num_layers: int) -> int:
        return self.resolve_layers(num_layers).index(layer)

    def target(self, layer: int, visual_in: Tensor, num_layers: int) -> Tensor:
        """``[B]`` visual tokens kept (before recycling) after ``layer``."""
        i = self._position(layer, num_layers)
        if self.config.counts is not None:
            return torch.full_like(visual_in, self.config.counts[i])
        return RETAIN[self.config.retain][i] * visual_in // _REF_TOKENS

    def recycled(self, dropped: Tensor) -> tuple[Tensor, Tensor]:
        """``(m, c)`` ``[B]``: dropped tokens recycled and clusters they form."""
        if not self.config.recycle:
            z = torch.zeros_like(dropped)
            return z, z
        m = torch.where(dropped > 0, floor_count(dropped, RECYCLE_FRACTION) + 1, torch.zeros_like(dropped))
        m = torch.minimum(m, dropped)
        return m, torch.where(m > 0, m // 10 + 1, torch.zeros_like(m))

    def kept_visual(self, layer: int, alive: Tensor, visual_in: Tensor, num_layers: int) -> Tensor:
        k = torch.minimum(alive, self.target(layer, visual_in, num_layers))
        return k + self.recycled(alive - k)[1]

    # ------------------------------------------------------------------ deciding
    def raters(self, ctx: LayerContext) -> Tensor:
        """``[B, L]`` bool: rater positions in the current sequence (chosen at the first call)."""
        text = ctx.valid & ~ctx.visual
        rank = torch.cumsum(text.long(), 1) - 1  # text tokens are never dropped: their rank is stable
        if "raters" not in ctx.state:
            if ctx.embeds is None:
                raise InputError("sparsevlm chooses its raters from the LLM input embeddings: the integration must "
                                 "fill LayerContext.embeds at the operator's first layer")
            after = text_after_visual(ctx)
            chosen = _choose_raters(ctx.embeds.float(), ctx.visual, after)
            chosen = torch.where(chosen.any(1, keepdim=True), chosen, after)
            last = torch.zeros_like(chosen).scatter_(1, ctx.last.unsqueeze(1), True)
            chosen = torch.where(chosen.any(1, keepdim=True), chosen, last & text)
            T = int(text.sum(1).max().item())
            flags = torch.zeros(ctx.batch_size, T + 1, dtype=torch.bool, device=chosen.device)
            flags.scatter_(1, torch.where(chosen, rank, torch.full_like(rank, T)), True)
            ctx.state["raters"] = flags[:, :T]
        flags = ctx.state["raters"]
        return text & flags.gather(1, rank.clamp(0, flags.shape[1] - 1))

    def scores(self, ctx: LayerContext) -> Tensor:
        """``[B, L]``: mean over raters of the head-mean attention each position receives from them."""
        rater = self.raters(ctx)
        n = rater.sum(1)
        R = int(n.max().item())
        order = torch.sort((~rater).to(torch.uint8), dim=1, stable=True).indices[:, :R]
        rows = torch.where(torch.arange(R, device=n.device).unsqueeze(0) < n.unsqueeze(1), order,
                           torch.full_like(order, -1))
        att = ctx.attention_rows(rows).mean(1)  # [B, R, L], zero rows for padding entries
        return att.sum(1) / n.clamp_min(1).unsqueeze(1).to(att.dtype)

    def decide(self, ctx: LayerContext) -> Tensor | LayerUpdate:
        alive = ctx.visual_counts
        k = torch.minimum(alive, self.target(ctx.layer, ctx.visual_in, ctx.num_layers))
        scores = self.scores(ctx)
        keep = keep_top_visual(ctx, scores, k)
        m, c = self.recycled(alive - k)
        if not bool((c > 0).any()):
            return keep
        return self._recycle(ctx, scores, keep, m, c)

    def _recycle(self, ctx: LayerContext, scores: Tensor, keep: Tensor, m: Tensor, c: Tensor) -> LayerUpdate:
        B, L = keep.shape
        dev = keep.device
        dropped = ctx.visual & ~keep
        order = descending_order(scores.float(), dropped)  # dropped tokens by descending score
        Mx = int(m.max().item())
        pos = order[:, :Mx]
        live = torch.arange(Mx, device=dev).unsqueeze(0) < m.unsqueeze(1)
        x = ctx.hidden.gather(1, pos.unsqueeze(-1).expand(B, Mx, ctx.hidden.shape[-1])).float()
        centres, assign = dpc_knn(x, live, c)
        C = int(c.max().item())
        onehot = torch.zeros(B, C + 1, Mx, dtype=x.dtype, device=dev)
        onehot.scatter_(1, torch.where(live, assign, torch.full_like(assign, C)).unsqueeze(1), 1.0)
        onehot = onehot[:, :C]
        add = torch.matmul(onehot, x) / onehot.sum(2, keepdim=True).clamp_min(1)
        add_valid = torch.arange(C, device=dev).unsqueeze(0) < c.unsqueeze(1)
        add_index = torch.where(add_valid, ctx.index.gather(1, pos.gather(1, centres.clamp(0, Mx - 1))),
                                torch.full_like(centres, -1))
        p = torch.arange(L, device=dev).expand(B, L)
        kept_vis = keep & ctx.visual
        last_kept = torch.where(kept_vis, p, torch.full_like(p, -1)).max(1).values
        first_vis = torch.where(ctx.visual, p, torch.full_like(p, L)).min(1).values
        after = torch.where(last_kept >= 0, last_kept, first_vis - 1)
        add = add.masked_fill(~add_valid.unsqueeze(-1), 0).to(ctx.hidden.dtype)
        return LayerUpdate(keep=keep, add=add, add_valid=add_valid, add_after=after, add_index=add_index)


def _choose_raters(e: Tensor, visual: Tensor, after: Tensor) -> Tensor:
    """``[B, L]`` bool: text positions (of ``after``) whose mean over visual rows of
    ``softmax over text (V Tᵀ)`` exceeds its mean over the text tokens."""
    B, L, D = e.shape
    na = after.sum(1)
    A = int(na.max().item())
    if A == 0:
        return torch.zeros_like(after)
    cols = torch.sort((~after).to(torch.uint8), dim=1, stable=True).indices[:, :A]  # text positions, in order
    live = torch.arange(A, device=e.device).unsqueeze(0) < na.unsqueeze(1)
    rel = torch.matmul(e, e.gather(1, cols.unsqueeze(-1).expand(B, A, D)).transpose(1, 2))  # [B, L, A]
    rel = rel.masked_fill(~live.unsqueeze(1), float("-inf"))
    sm = torch.softmax(rel, dim=-1).masked_fill(~visual.unsqueeze(2), 0.0)
    s = sm.sum(1) / visual.sum(1).clamp_min(1).unsqueeze(1).to(sm.dtype)  # [B, A]
    mean = (s * live).sum(1) / na.clamp_min(1).to(s.dtype)
    pick = live & (s > mean.unsqueeze(1))
    out = torch.zeros(B, L + 1, dtype=torch.bool, device=e.device)
    out.scatter_(1, torch.where(pick, cols, torch.full_like(cols, L)), True)
    return out[:, :L]


def dpc_knn(x: Tensor, valid: Tensor, clusters: Tensor) -> tuple[Tensor, Tensor]:
    """Density-peak clustering with k-nearest-neighbour density, per row.

    ``x [B, M, D]`` float, ``valid [B, M]`` left-packed, ``clusters [B]`` (``k`` of the kNN density
    equals the cluster count). Returns ``centres [B, C]`` (positions of the centres, by descending
    ``dist * density``; ties: earlier position) and ``assign [B, M]`` (each token's cluster number,
    its nearest centre; a centre is its own cluster).
    """
    B, M, D = x.shape
    dev = x.device
    dist = torch.cdist(x, x) / D**0.5  # [B, M, M]
    pair = valid.unsqueeze(2) & valid.unsqueeze(1)
    inf = torch.tensor(float("inf"), device=dev, dtype=dist.dtype)
    dist_v = torch.where(pair, dist, inf)
    K = int(clusters.max().item())
    near = torch.sort(dist_v, dim=-1, stable=True).values[..., :K]  # [B, M, K], self (0) first
    kmask = torch.arange(K, device=dev).view(1, 1, K) < clusters.view(B, 1, 1)
    msq = (near.pow(2) * kmask).sum(-1) / clusters.clamp_min(1).view(B, 1).to(dist.dtype)
    density = torch.exp(-msq)
    dist_max = torch.where(pair, dist, torch.zeros_like(dist)).flatten(1).max(1).values  # [B]
    denser = (density.unsqueeze(1) > density.unsqueeze(2)) & pair  # [B, i, j]: j denser than i
    parent = torch.where(denser, dist, dist_max.view(B, 1, 1).expand(B, M, M)).min(-1).values
    score = (parent * density).masked_fill(~valid, float("-inf"))
    C = int(clusters.max().item())
    centres = descending_order(score, valid)[:, :C]  # [B, C]
    cvalid = torch.arange(C, device=dev).unsqueeze(0) < clusters.unsqueeze(1)
    to_centre = dist.gather(2, centres.unsqueeze(1).expand(B, M, C)).masked_fill(~cvalid.unsqueeze(1), float("inf"))
    assign = to_centre.argmin(-1)  # ties: the first centre in order
    own = torch.where(cvalid, centres, torch.full_like(centres, M))
    fixed = torch.zeros(B, M + 1, dtype=torch.long, device=dev)
    fixed.scatter_(1, own, torch.arange(C, device=dev).expand(B, C))
    is_centre = torch.zeros(B, M + 1, dtype=torch.bool, device=dev).scatter_(1, own, True)[:, :M]
    assign = torch.where(is_centre, fixed[:, :M], assign)
    return centres, assign
