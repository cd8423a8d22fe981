"""Per-crop budgets that HiRED and GlobalCom² choose for one synthetic LLaVA-NeXT AnyRes image.

One image: a 2x2 crop grid of 24x24 patches (P = 5 partitions of 576) from a 300x500 (h x w)
original, so LLaVA-NeXT's unpad keeps rows 10..37 of the 48-row crop grid (336 of each crop's 576
tokens). Signals are seeded random: per partition, pre-softmax CLS logits ``2*randn`` for CLIP layers
0, 22 and 23, ``cls_attn`` their softmax over the partition. For each method and compat mode the
script prints the allocated budget per partition (``allocate()``, what a following selector
fills), the tokens each partition keeps with the method's own selection (``forward``), and the
newline policy. Run from the repository root: ``PYTHONPATH=. python eval/allocator_budgets.py [--seed 0]``.
"""

from __future__ import annotations

import argparse

import torch

import vtc
from vtc import Layout, VisualTokens


def synthetic_image(seed: int, side: int = 24, crops: tuple[int, int] = (2, 2), size: tuple[int, int] = (300, 500)):
    P, N = 1 + crops[0] * crops[1], side * side
    g = torch.Generator().manual_seed(seed)
    logits = {l: 2 * torch.randn(P, N, generator=g, dtype=torch.float64) for l in (0, 22, 23)}
    attn = {l: v.softmax(-1).view(1, -1) for l, v in logits.items()}
    return VisualTokens(
        x=torch.randn(1, P * N, 8, generator=g),
        group=(torch.arange(P * N) // N).unsqueeze(0),
        layout=Layout.for_anyres(side, crops, image_size=size),
        signals={"cls_attn": attn, "cls_logits": {l: v.view(1, -1) for l, v in logits.items()}},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tok = synthetic_image(args.seed)
    P = tok.layout.num_partitions
    print(f"image: 2x2 crops of 24x24, original 300x500 (h x w), {tok.num_tokens} tokens, seed {args.seed}")
    print(f"{'pipeline':<34} {'budget [thumb, c1..c4]':<28} {'sum':>4}  {'kept by forward':<28} {'sum':>4}  newlines")
    for spec in ("hired", "hired:compat=clean", "globalcom2", "globalcom2:compat=clean"):
        op = vtc.build(spec)[0]
        budget = op.allocate(tok).budget[0].tolist()
        out = op(tok)
        kept = torch.bincount(out.group[0, : out.counts[0]], minlength=P).tolist()
        print(f"{spec:<34} {str(budget):<28} {sum(budget):>4}  {str(kept):<28} {sum(kept):>4}  {op.newline_policy}")


if __name__ == "__main__":
    main()
