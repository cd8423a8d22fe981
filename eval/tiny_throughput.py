"""Training throughput of candidate sizes of the embedded tiny models on this CPU.

Runs a few real training steps (``vtc.models.tiny.train.Trainer.step``: batch building, forward,
backward, AdamW) for each candidate, all tokens (``prune_share=0``: the slowest kind of step) and
with the recipe's token pruning, in fp32 and under bf16 autocast, interleaved so that a load
change on a shared machine hits every candidate alike. Prints images/s (wall clock) and CPU
seconds per image, and writes the rows as JSON lines.

    python eval/tiny_throughput.py --threads 2 --steps 4 --out eval/results/tiny_throughput.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

CANDIDATES = {
    # name: (variant, spec overrides)
    "v48x4-t96x4": ("tiny-llava", dict(vision_hidden=48, vision_layers=4, text_hidden=96, text_layers=4,
                                        text_intermediate=256)),
    "v64x4-t128x4": ("tiny-llava", {}),
    "v64x6-t128x6": ("tiny-llava", dict(vision_layers=6, text_layers=6)),
    "v96x4-t192x4": ("tiny-llava", dict(vision_hidden=96, text_hidden=192, text_intermediate=512)),
    "next-v64x4-t128x4": ("tiny-llava-next", {}),
    "mqt-v64x4-t128x4": ("tiny-mqt", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per setting (after 1 warm-up step)")
    ap.add_argument("--candidates", nargs="*", default=list(CANDIDATES))
    ap.add_argument("--modes", nargs="*", default=["full", "pruned"], help="full: all tokens; pruned: recipe")
    ap.add_argument("--bf16", nargs="*", default=["0", "1"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    import dataclasses

    import vtc.models.tiny.variants as variants_mod
    from vtc.models.tiny.train import RunConfig, Trainer

    trainers, recipes = {}, {}
    for name in args.candidates:
        var, spec = CANDIDATES[name]
        # no trained tiny-llava is needed to time tiny-mqt's steps: start it from scratch
        v = variants_mod.VARIANT_SPECS[var]
        variants_mod.VARIANT_SPECS[var] = dataclasses.replace(v, init_from=None)
        try:
            trainers[name] = Trainer(RunConfig(var, steps=10_000, out=f"/tmp/vtc-throughput-{name}", spec=spec,
                                               threads=args.threads))
        finally:
            variants_mod.VARIANT_SPECS[var] = v
        recipes[name] = trainers[name].recipe
    rows = []
    lo_load = os.getloadavg()[0]
    for mode in args.modes:
        for bf in args.bf16:
            times: dict[str, list[tuple[float, float]]] = {n: [] for n in trainers}
            for n, t in trainers.items():
                t.cfg.bf16 = bf == "1"
                t.recipe = dataclasses.replace(recipes[n], prune_share=0.0) if mode == "full" else recipes[n]
                t.step()  # warm-up
            for _ in range(args.steps):
                for n, t in trainers.items():
                    c0, w0 = time.process_time(), time.time()
                    t.step()
                    times[n].append((time.time() - w0, time.process_time() - c0))
            for n, t in trainers.items():
                wall = statistics.median(w for w, _ in times[n])
                cpu = statistics.median(c for _, c in times[n])
                params = sum(p.numel() for p in t.model.parameters())
                row = {"candidate": n, "mode": mode, "bf16": bf == "1", "batch": t.recipe.batch,
                       "params_M": round(params / 1e6, 3), "images_per_s": round(t.recipe.batch / wall, 2),
                       "cpu_s_per_image": round(cpu / t.recipe.batch, 4), "threads": args.threads,
                       "loadavg": round(os.getloadavg()[0], 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"load average at start {lo_load:.2f}, at end {os.getloadavg()[0]:.2f}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
