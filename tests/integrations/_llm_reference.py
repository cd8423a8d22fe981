"""Brute-force references for the in-LLM stage: one sample, unpadded, FULL eager attention.

:func:`language_inputs` records what the stock language model receives (input embeddings, M-RoPE or
1-D position ids, Qwen3-VL's DeepStack features). :func:`run` walks the stock decoder layers one
by one on an eager-attention copy of the model, reads each layer's full ``[H, L, L]`` softmax map
from the attention module's own output (eager attention returns it), applies a method's rule
written here from its description (not vtc's code), physically removes the dropped tokens (and
inserts recycled ones) and recomputes the position embeddings of the survivors for the next
layer. It returns the visual tokens alive after each layer (their number among the visual tokens
the LLM received; a recycled token is its centre's number) and the last position's logits.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch


def eager_copy(model):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref


@torch.no_grad()
def language_inputs(model, inputs) -> dict:
    """What the stock language model receives for ``inputs`` (one sample)."""
    seen = {}

    def hook(_m, _args, kw):
        seen.update({k: kw.get(k) for k in ("inputs_embeds", "position_ids", "visual_pos_masks",
                                            "deepstack_visual_embeds")})

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        h.remove()
    return seen


@dataclass
class Slot:
    kind: str  # "t" text, "v" visual, "c" recycled
    number: int  # text: input column; visual: its number among the LLM's visual tokens; recycled: its centre's
    ids: torch.Tensor  # [R] its position id(s)
    col: int = -1  # its column in the language model's input (-1: recycled)


@dataclass
class State:
    raters: list[int] | None = None
    extra: dict = field(default_factory=dict)


def _top(scores: dict[int, float], k: int) -> list[int]:
    return sorted(scores, key=lambda i: (-scores[i], i))[:k]


# ---------------------------------------------------------------------------------------- rules
def last_row_rule(count):
    """FastV / PyramidDrop: head-mean attention of the last token's row; keep ``count(layer, alive, n_in)``."""
    def rule(layer, A, h, slots, state, n_in):
        s = A[:, -1, :].mean(0)
        vis = [i for i, t in enumerate(slots) if t.kind != "t"]
        return set(_top({i: float(s[i]) for i in vis}, count(layer, len(vis), n_in))), []
    return rule


def aim_rule(start, step, temperature=0.1, iterations=5):
    def rule(layer, A, h, slots, state, n_in):
        vis = [i for i, t in enumerate(slots) if t.kind != "t"]
        k = min(len(vis), int(n_in * max(0.0, 1 - (layer - start + 1) * step) + 1e-9))
        if k >= len(vis):
            return set(vis), []
        M = A.double().pow(1.0 / temperature)  # softmax(z / T) from softmax(z), row by row
        M = M / M.sum(-1, keepdim=True)
        L = A.shape[-1]
        d = torch.full((A.shape[0], 1, L), 1.0 / L, dtype=torch.float64)
        for _ in range(iterations):
            d = d @ M
        imp = d[:, 0].pow(2).mean(0).sqrt()
        return set(_top({i: float(imp[i]) for i in vis}, k)), []
    return rule


def dpc(x: torch.Tensor, c: int) -> tuple[list[int], list[int]]:
    """Density-peak clustering with kNN density: centres by descending dist*density, nearest-centre assignment."""
    M, D = x.shape
    dist = [[float(torch.linalg.vector_norm(x[i] - x[j])) / math.sqrt(D) for j in range(M)] for i in range(M)]
    dens = [math.exp(-sum(v * v for v in sorted(row)[:c]) / c) for row in dist]
    far = max(max(row) for row in dist)
    parent = [min([dist[i][j] for j in range(M) if dens[j] > dens[i]], default=far) for i in range(M)]
    centres = sorted(range(M), key=lambda i: (-parent[i] * dens[i], i))[:c]
    assign = [centres.index(i) if i in centres else min(range(c), key=lambda j: (dist[i][centres[j]], j))
              for i in range(M)]
    return centres, assign


def sparsevlm_rule(layers, counts, embeds, recycle=True):
    """SparseVLM v1: raters from the input embeddings, mean rater attention, DPC-kNN recycling."""
    def rule(layer, A, h, slots, state, n_in):
        vis = [i for i, t in enumerate(slots) if t.kind != "t"]
        if state.raters is None:
            after = [i for i in range(vis[-1] + 1, len(slots))]
            e = embeds[[slots[i].col for i in vis]]
            et = embeds[[slots[i].col for i in after]]
            s = torch.softmax(e.float() @ et.float().T, dim=-1).mean(0)
            state.raters = [slots[after[j]].number for j in range(len(after)) if float(s[j]) > float(s.mean())] \
                or [slots[i].number for i in after]
        rows = [i for i, t in enumerate(slots) if t.kind == "t" and t.number in state.raters]
        score = A.mean(0)[rows].mean(0)
        scores = {i: float(score[i]) for i in vis}
        chosen = set(_top(scores, min(len(vis), counts[layers.index(layer)])))
        dropped = [i for i in vis if i not in chosen]
        if not recycle or not dropped:
            return chosen, []
        m = min(len(dropped), int(0.3 * len(dropped)) + 1)
        rec = sorted(dropped, key=lambda i: (-scores[i], i))[:m]
        c = m // 10 + 1
        x = h[rec].float()
        centres, assign = dpc(x, c)
        added = []
        for j, ci in enumerate(centres):
            members = [i for i in range(m) if assign[i] == j]
            added.append((slots[rec[ci]].number, x[members].mean(0)))
        return chosen, added
    return rule


# ---------------------------------------------------------------------------------------- the walk
@torch.no_grad()
def run(ref_model, seen: dict, image_token_mask: torch.Tensor, schedule: dict[int, tuple], policy: str = "original"):
    """Walk the decoder of ``ref_model`` (eager) over one sample's language-model inputs ``seen``.

    ``image_token_mask [L]``: visual positions; ``schedule``: ``{layer: rule}``. Returns
    ``(alive, logits)``: ``alive[layer]`` the visual tokens' numbers after each layer, in order.
    """
    lm = ref_model.model.language_model
    emb = seen["inputs_embeds"][0]
    pos = seen["position_ids"]
    if pos is None:
        pos = torch.arange(emb.shape[0]).view(1, 1, -1)
    elif pos.dim() == 2:
        pos = pos.unsqueeze(0)
    elif pos.shape[0] == 4:  # Qwen's text row first
        pos = pos[1:]
    pos = pos[:, 0]  # [R, L]
    vis_numbers = torch.cumsum(image_token_mask.long(), 0) - 1
    slots = [Slot("v" if bool(image_token_mask[c]) else "t", int(vis_numbers[c]) if bool(image_token_mask[c]) else c,
                  pos[:, c], c) for c in range(emb.shape[0])]
    n_in = int(image_token_mask.sum())
    deep = seen.get("deepstack_visual_embeds")
    h = emb.unsqueeze(0)
    state = State()
    alive = []
    for layer, block in enumerate(lm.layers):
        L = h.shape[1]
        ids = torch.stack([t.ids for t in slots], 1)  # [R, L]
        rope = ids.unsqueeze(1) if ids.shape[0] == 3 else ids
        cos, sin = lm.rotary_emb(h, rope)
        causal = torch.full((L, L), torch.finfo(h.dtype).min).triu(1).view(1, 1, L, L)
        got: dict = {}
        hk = block.self_attn.register_forward_hook(lambda _m, _a, out, got=got: got.update(A=out[1]))
        try:
            h = block(h, attention_mask=causal, position_embeddings=(cos, sin), position_ids=None)
        finally:
            hk.remove()
        h = h[0] if isinstance(h, tuple) else h
        if deep is not None and layer < len(deep):
            at = [i for i, t in enumerate(slots) if t.kind == "v"]
            h = h.clone()
            h[0, at] += deep[layer][[slots[i].number for i in at]].to(h.dtype)
        if layer in schedule:
            keep, added = schedule[layer](layer, got["A"][0], h[0], slots, state, n_in)
            new_slots, rows = [], []
            vis_kept = [i for i, t in enumerate(slots) if t.kind != "t" and i in keep]
            first_vis = next(i for i, t in enumerate(slots) if t.kind != "t")
            insert_after = vis_kept[-1] if vis_kept else first_vis - 1
            if insert_after < 0:
                for number, hid in added:
                    new_slots.append(Slot("c", number, slots[0].ids))
                    rows.append(hid.to(h.dtype))
            for i, t in enumerate(slots):
                if t.kind == "t" or i in keep:
                    new_slots.append(t)
                    rows.append(h[0, i])
                if i == insert_after:
                    for number, hid in added:
                        new_slots.append(Slot("c", number, t.ids))
                        rows.append(hid.to(h.dtype))
            changed = len(new_slots) != len(slots) or bool(added)
            slots, h = new_slots, torch.stack(rows).unsqueeze(0)
            if policy == "contiguous" and changed:  # renumbered from the first token's id, no gaps
                base = slots[0].ids
                slots = [Slot(t.kind, t.number, base + j, t.col) for j, t in enumerate(slots)]
        alive.append([t.number for t in slots if t.kind != "t"])
    h = lm.norm(h)
    return alive, ref_model.lm_head(h[:, -1])[0]
