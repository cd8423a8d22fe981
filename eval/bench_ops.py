"""CPU cost of every registered operator on one LLaVA-1.5-sized batch, as a Markdown table.

Each operator in ``vtc.list_ops()`` runs on the same synthetic batch (default 8 images x 576 tokens x
1024 fp32 features on a 24x24 grid, with the signals its ``requires`` names: CLS attention as
softmax rows, keys as Gaussian vectors) at budget ``keep=64`` where it takes one (m3: 64 = 8x8).
For each operator: a few warm-up calls, then the median (and min/max) wall time and process CPU
time of ``--repeats`` timed calls. Wall time is what a caller waits; CPU time sums over torch's
threads. Numbers depend on the machine and on its load; compare operators within one run.

Run: ``python eval/bench_ops.py`` (about 15 s). Torch runs on one thread unless ``--threads N``: on
a shared, oversubscribed machine two intra-op threads made every operator several times slower in
wall time (their threads wait on each other while other processes hold the cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import torch

import vtc
from vtc.registry import get_op

#: arguments for operators whose budget is not ``keep=<count per image>``
SPECIAL = {
    "m3": lambda keep, dim: {"keep": keep},  # 64 = 8x8: a square whose side divides 24
    # a fresh MQT-LLaVA-shaped projector (256 queries, 16 heads, to a 4096-wide LLM) for the batch's width
    "mqt": lambda keep, dim: {"keep": keep, "weights": None, "dim": dim, "out_dim": 4096, "heads": 16,
                              "queries": 256},
}


def make_tokens(batch: int, side: int, dim: int, requires: dict, seed: int = 0) -> vtc.VisualTokens:
    g = torch.Generator().manual_seed(seed)
    n = side * side
    x = torch.randn(batch, n, dim, generator=g)
    signals: dict = {}
    for name, layers in requires.items():
        per = {}
        for layer in layers:
            if name == "cls_attn":
                per[layer] = torch.randn(batch, n, generator=g).softmax(-1)
            elif name == "keys":
                per[layer] = torch.randn(batch, n, 64, generator=g)
            else:
                per[layer] = torch.randn(batch, n, generator=g)
        signals[name] = per
    return vtc.VisualTokens(x=x, signals=signals, layout=vtc.Layout.grid(side))


def build_op(name: str, keep: int, dim: int):
    if name in SPECIAL:
        return vtc.create(name, **SPECIAL[name](keep, dim))
    fields = {f.name for f in dataclasses.fields(get_op(name).Config)}
    return vtc.create(name, keep=keep) if "keep" in fields else vtc.create(name)


def time_op(op, tokens, warmup: int, repeats: int) -> tuple[list[float], list[float], vtc.VisualTokens]:
    with torch.inference_mode():
        for _ in range(warmup):
            out = op(tokens)
        wall, cpu = [], []
        for _ in range(repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            out = op(tokens)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    return wall, cpu, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--side", type=int, default=24, help="grid side: tokens per image = side**2")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--ops", nargs="*", default=None, help="operator names (default: every registered one)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    names = args.ops or vtc.list_ops()
    print(f"vtc {vtc.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads; batch {args.batch} x {args.side ** 2} tokens x {args.dim} fp32, "
          f"median of {args.repeats} after {args.warmup} warm-up\n")
    print("| operator | config | tokens out / image | wall ms (median) | wall ms (min-max) | CPU ms (median) |")
    print("|---|---|---|---:|---:|---:|")
    for name in names:
        try:
            op = build_op(name, args.keep, args.dim)
            tokens = make_tokens(args.batch, args.side, args.dim, op.requires)
            wall, cpu, out = time_op(op, tokens, args.warmup, args.repeats)
        except Exception as e:  # one operator's failure must not hide the others' numbers
            print(f"| {name} | | error: {type(e).__name__}: {e} | | | |")
            continue
        counts = sorted(set(out.counts.tolist()))
        ms = [1e3 * v for v in wall]
        print(f"| {name} | `{vtc.build(op)}` | {','.join(map(str, counts))} | {statistics.median(ms):.1f} | "
              f"{min(ms):.1f}-{max(ms):.1f} | {1e3 * statistics.median(cpu):.1f} |")


if __name__ == "__main__":
    main()
