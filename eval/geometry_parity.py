"""LLaVA-NeXT crop geometry of the official HiRED and GlobalCom² code, measured on example sizes.

Three tables (all deterministic, no model needed):

1. **Unpad arithmetic**: over every image size ``height x width`` in ``[--lo, --hi)`` pixels with
   LLaVA-NeXT-7B's geometry (336-px crops of 24x24 patches, its five grid pinpoints), how many sizes
   keep other rows or columns under HiRED's fork's float32 arithmetic and original LLaVA's float64
   truncation than under current transformers' ``round(x, 7)`` (``vtc.geometry.unpad_bounds``).
2. **HiRED**: tokens that reach the language model at ``ratio=0.2`` with ``compat="official"``
   (the fork's transposed tiling of non-square crop grids and its float32 unpad) and
   ``compat="clean"``, per image size; CLS attention is random (mean over ``--seeds``).
3. **GlobalCom²**: of the crop tokens ``compat="official"`` keeps, how many its rank placement
   moves off their own cell, and whether the sequence (tokens and the newline after every grid row)
   differs from the one with each token at its own cell.

Run: ``python eval/geometry_parity.py`` (about 20 s).
"""

from __future__ import annotations

import argparse

import torch

import vtc
from vtc.geometry import AnyResGrid, Layout, unpad_bounds
from vtc.taps.layers import LayerSpace

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SIZES = [(336, 672), (672, 336), (336, 1008), (1008, 336), (672, 672), (427, 640), (640, 427), (500, 300),
         (300, 500), (800, 1280)]


def crop_grid(h: int, w: int) -> tuple[int, int]:
    from transformers.image_processing_utils import select_best_resolution

    bh, bw = select_best_resolution((h, w), PINPOINTS)
    return bh // 336, bw // 336


def rounding_table(lo: int, hi: int) -> None:
    n, diff = 0, {"float32": [], "float64": []}
    for h in range(lo, hi):
        for w in range(lo, hi):
            nh, nw = crop_grid(h, w)
            grid = (nh * 24, nw * 24)
            stock = unpad_bounds(grid, (h, w))
            n += 1
            for r, found in diff.items():
                if unpad_bounds(grid, (h, w), r) != stock:
                    found.append((h, w))
    print(f"| unpad arithmetic | sizes {lo}..{hi - 1} px | keep other rows/columns than transformers | examples |")
    print("|---|---:|---:|---|")
    for r, found in diff.items():
        ex = ", ".join(f"{h}x{w}" for h, w in found[:5])
        print(f"| {r} | {n} | {len(found)} ({len(found) / n * 1e4:.1f} per 10^4) | {ex} |")


CLIP_L = LayerSpace(24, 22)  # LLaVA-NeXT-7B's tower: 24 layers, features from layer 22


def anyres_tokens(size: tuple[int, int], op, seed: int) -> vtc.VisualTokens:
    """One image's complete partitions with random signals at the layers ``op`` reads."""
    nh, nw = crop_grid(*size)
    P, N = 1 + nh * nw, 576
    g = torch.Generator().manual_seed(seed)
    signals = {name: {l: torch.rand(1, P * N, generator=g, dtype=torch.float64) for l in CLIP_L.resolve_all(layers)}
               for name, layers in op.requires.items()}
    return vtc.VisualTokens(x=torch.randn(1, P * N, 4, generator=g, dtype=torch.float64),
                            group=(torch.arange(P * N) // N).unsqueeze(0),
                            layout=Layout.for_anyres(24, (nh, nw), image_size=size), signals=signals,
                            layer_space=CLIP_L)


def hired_table(seeds: int) -> None:
    print("\n| image (h x w) | crops | HiRED official | HiRED clean |")
    print("|---|---|---:|---:|")
    for size in SIZES:
        got = {}
        for compat in ("official", "clean"):
            op = vtc.create("hired", ratio=0.2, compat=compat)
            n = 0
            for seed in range(seeds):
                n += int(op(anyres_tokens(size, op, seed)).counts[0])
            got[compat] = n / seeds
        print(f"| {size[0]} x {size[1]} | {'x'.join(map(str, crop_grid(*size)))} | {got['official']:.1f} | "
              f"{got['clean']:.1f} |")


def sequence(pos, cells, idx, W: int, rows: int) -> list[int]:
    """The crop part of the sequence: tokens ``idx`` (crop cells ``cells``) emitted at grid positions
    ``pos``, a newline (negative ids) after every one of the ``rows`` grid rows."""
    keys = [(int(pos[c, t]) // W * (W + 1) + int(pos[c, t]) % W, i) for (c, t), i in zip(cells, idx)]
    keys += [(r * (W + 1) + W, -1 - r) for r in range(rows)]
    return [i for _, i in sorted(keys)]


def globalcom2_table(seeds: int) -> None:
    print("\n| image (h x w) | crops | kept crop tokens | moved by rank placement | sequence differs |")
    print("|---|---|---:|---:|---|")
    op = vtc.create("globalcom2")
    for size in SIZES:
        lay = Layout.for_anyres(24, crop_grid(*size), image_size=size)
        g = AnyResGrid.from_layout(lay, "measure", op.crop_rules)
        own, _ = g.crop_cells()
        placed = g.placed_cells()
        W = g.width
        kept = moved = differs = 0
        for seed in range(seeds):
            out = op(anyres_tokens(size, op, seed))
            idx = [i for i in out.index[0, : int(out.counts[0])].tolist() if i >= 576]
            cells = [divmod(i - 576, 576) for i in idx]
            kept += len(idx)
            moved += sum(int(own[c, t]) != int(placed[c, t]) for c, t in cells)

            differs += sequence(own, cells, idx, W, g.tiles[0] * 24) != sequence(placed, cells, idx, W, g.tiles[0] * 24)
        print(f"| {size[0]} x {size[1]} | {'x'.join(map(str, crop_grid(*size)))} | {kept / seeds:.1f} | "
              f"{moved / seeds:.1f} | {differs} of {seeds} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lo", type=int, default=100)
    ap.add_argument("--hi", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rounding_table(args.lo, args.hi)
    hired_table(args.seeds)
    globalcom2_table(args.seeds)


if __name__ == "__main__":
    main()
