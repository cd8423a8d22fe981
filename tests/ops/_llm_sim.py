"""A stand-in for the phase-B integration, for testing in-LLM operators without a language model.

Each token has a fixed random hidden state per decoder layer; a layer's post-RoPE q/k are fixed
random projections of it (grouped-query heads). :func:`run_batched` walks the layers with a padded
batch (left padding, different lengths per sample), builds a :class:`LayerContext` with
``LayerContext.from_qk`` after each scheduled layer, calls the operators and removes what they
drop (and inserts what they add). :func:`run_reference` walks one sample, unpadded, and asks a
brute-force decision function instead. Both return the visual tokens alive after every layer, as
token ids (a recycled token is the tuple of the ids it merged), so the two can be compared
index-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtc.ops.llm_layer import LayerContext, LayerUpdate


@dataclass
class World:
    """Random prompts and per-layer token features.

    Sample ``b`` is ``sys[b]`` text tokens, ``vis[b]`` visual tokens, ``txt[b]`` text tokens; token
    ids are positions in that unpadded sequence.
    """

    sys: list[int]
    vis: list[int]
    txt: list[int]
    layers: int
    D: int = 16
    H: int = 4
    Hkv: int = 2
    hd: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        L0 = max(s + v + t for s, v, t in zip(self.sys, self.vis, self.txt))
        B = len(self.sys)
        self.hid = torch.randn(B, self.layers, L0, self.D, generator=g)
        self.emb = torch.randn(B, L0, self.D, generator=g)
        self.wq = torch.randn(self.layers, self.D, self.H * self.hd, generator=g) / self.D**0.5
        self.wk = torch.randn(self.layers, self.D, self.Hkv * self.hd, generator=g) / self.D**0.5
        self.added: dict[tuple, torch.Tensor] = {}

    def ids(self, b: int) -> list:
        return list(range(self.sys[b] + self.vis[b] + self.txt[b]))

    def is_visual(self, b: int, tid) -> bool:
        return isinstance(tid, tuple) or self.sys[b] <= tid < self.sys[b] + self.vis[b]

    def hidden(self, b: int, layer: int, tid) -> torch.Tensor:
        return self.added[(b, tid)] if isinstance(tid, tuple) else self.hid[b, layer, tid]

    def embed(self, b: int, tid) -> torch.Tensor:
        return torch.zeros(self.D) if isinstance(tid, tuple) else self.emb[b, tid]

    def qk(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[L, D]`` hidden -> q ``[H, L, hd]``, k ``[Hkv, L, hd]``."""
        L = h.shape[0]
        q = (h @ self.wq[layer]).view(L, self.H, self.hd).transpose(0, 1)
        k = (h @ self.wk[layer]).view(L, self.Hkv, self.hd).transpose(0, 1)
        return q, k

    def visual_number(self, b: int, tid) -> int:
        return tid[3] if isinstance(tid, tuple) else (tid - self.sys[b] if self.is_visual(b, tid) else -1)


def run_batched(world: World, pipeline) -> list[list[list]]:
    """Alive visual token ids after each layer, per sample: ``out[b][layer]``."""
    B = len(world.sys)
    seqs = [world.ids(b) for b in range(B)]
    schedule = pipeline.layer_schedule(world.layers)
    states = {id(op): {} for op in pipeline}
    vis_in = torch.tensor(world.vis)
    out = [[] for _ in range(B)]
    for layer in range(world.layers):
        for op in schedule.get(layer, []):
            L = max(len(s) for s in seqs)
            pad = [L - len(s) for s in seqs]
            hidden = torch.zeros(B, L, world.D)
            embeds = torch.zeros(B, L, world.D)
            visual = torch.zeros(B, L, dtype=torch.bool)
            valid = torch.zeros(B, L, dtype=torch.bool)
            index = torch.full((B, L), -1, dtype=torch.long)
            for b, s in enumerate(seqs):
                for j, tid in enumerate(s):
                    p = pad[b] + j
                    hidden[b, p] = world.hidden(b, layer, tid)
                    embeds[b, p] = world.embed(b, tid)
                    visual[b, p] = world.is_visual(b, tid)
                    valid[b, p] = True
                    index[b, p] = world.visual_number(b, tid)
            q, k = world.qk(layer, hidden.view(B * L, world.D))
            q = q.view(world.H, B, L, world.hd).transpose(0, 1)
            k = k.view(world.Hkv, B, L, world.hd).transpose(0, 1)
            ctx = LayerContext.from_qk(q, k, layer=layer, num_layers=world.layers, hidden=hidden, visual=visual,
                                       valid=valid, index=index, visual_in=vis_in, embeds=embeds,
                                       state=states[id(op)])
            res = op(ctx)
            keep = res.keep if isinstance(res, LayerUpdate) else res
            assert bool((keep | visual).all()), "text or padding dropped"
            new = []
            for b, s in enumerate(seqs):
                kept = [tid for j, tid in enumerate(s) if bool(keep[b, pad[b] + j])]
                if isinstance(res, LayerUpdate) and res.add is not None:
                    after = int(res.add_after[b]) - pad[b]
                    anchor = s[after] if after >= 0 else None
                    added = []
                    for e in range(res.add.shape[1]):
                        if bool(res.add_valid[b, e]):
                            tid = ("c", layer, e, int(res.add_index[b, e]))
                            world.added[(b, tid)] = res.add[b, e]
                            added.append(tid)
                    at = kept.index(anchor) + 1 if anchor is not None else 0
                    kept = kept[:at] + added + kept[at:]
                new.append(kept)
            seqs = new
        for b in range(B):
            out[b].append([_name(t) for t in seqs[b] if world.is_visual(b, t)])
    return out


def _name(tid):
    return ("c", tid[3]) if isinstance(tid, tuple) else tid


def eager_attention(world: World, layer: int, h: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The full eager softmax map ``[H, L, L]`` of one unpadded sequence (fp32, causal, GQA by repeat)."""
    q, k = world.qk(layer, h)
    k = k.repeat_interleave(world.H // world.Hkv, dim=0)
    logits = (q @ k.transpose(1, 2)) * world.hd**-0.5 / temperature
    L = h.shape[0]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


def run_reference(world: World, b: int, decide, layers: list[int]) -> list[list]:
    """One sample, unpadded: ``decide(seq, layer, state) -> (kept ids, [(member ids, centre id, hidden)])``."""
    seq = world.ids(b)
    out = []
    state: dict = {}
    for layer in range(world.layers):
        if layer in layers:
            kept, added = decide(seq, layer, state)
            names = []
            for e, (_members, centre, h) in enumerate(added):
                tid = ("c", layer, e, world.visual_number(b, centre))
                world.added[(b, tid)] = h
                names.append(tid)
            last_vis = max((i for i, t in enumerate(kept) if world.is_visual(b, t)), default=None)
            if names:
                at = last_vis + 1 if last_vis is not None else next(
                    i for i, t in enumerate(seq) if world.is_visual(b, t))
                kept = kept[:at] + names + kept[at:]
            seq = kept
        out.append([_name(t) for t in seq if world.is_visual(b, t)])
    return out
