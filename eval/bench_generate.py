"""CPU time of ``generate()`` on the tiny random LLaVA / LLaVA-NeXT, stock vs. vtc.apply(pipeline).

Side by side in one process: for each model, the stock model and each pipeline run interleaved
(stock, pipeline A, pipeline B, stock, ...) after warm-up, on the same real photo and prompt, and
the table reports medians of wall time and of process CPU time per ``generate()`` call, the
visual tokens the language model received, and the ratio to stock. The tiny models have random
weights: this measures the machinery (tower, operators, compaction, a shorter LLM prefill and
KV cache), not a real model's speed-up. Example::

    python eval/bench_generate.py --pipelines "divprune:keep=64" "random:keep=64" --new-tokens 16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _photo():
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[0])  # 640x427


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["llava", "llava_next"], choices=["llava", "llava_next"])
    ap.add_argument("--pipelines", nargs="+", default=["divprune:keep=64", "random:keep=64"])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch
    import transformers

    import vtc
    from vtc.models.random import random_llava, random_llava_next

    torch.set_num_threads(args.threads)
    photo = _photo()
    rows = []
    for kind in args.models:
        model, proc = (random_llava if kind == "llava" else random_llava_next)()
        inputs = proc(images=[photo] * args.batch, text=["user : <image> what is in this photo ? assistant :"] * args.batch,
                      return_tensors="pt", padding=True)
        gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        variants = [("stock", None)] + [(p, vtc.build(p)) for p in args.pipelines]
        wall = {name: [] for name, _ in variants}
        cpu = {name: [] for name, _ in variants}
        visual = {}
        with torch.no_grad():
            for i in range(args.warmup + args.repeats):
                for name, pipe in variants:
                    handle = vtc.apply(model, pipe) if pipe is not None else None
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = model.generate(**inputs, **gen)
                    t1, c1 = time.perf_counter(), time.process_time()
                    if handle is not None:
                        visual[name] = handle.last.counts[0]
                        handle.remove()
                    else:
                        visual[name] = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
                    assert out.shape[1] == inputs["input_ids"].shape[1] + args.new_tokens
                    if i >= args.warmup:
                        wall[name].append(t1 - t0)
                        cpu[name].append(c1 - c0)
        base_w, base_c = statistics.median(wall["stock"]), statistics.median(cpu["stock"])
        for name, _ in variants:
            w, c = statistics.median(wall[name]), statistics.median(cpu[name])
            rows.append((kind, name, visual[name], w * 1e3, c * 1e3, w / base_w, c / base_c))

    head = (f"generate(): batch {args.batch}, {args.new_tokens} new tokens, {args.threads} thread(s), medians of "
            f"{args.repeats} after {args.warmup} warm-up; torch {torch.__version__}, transformers "
            f"{transformers.__version__}, {platform.processor() or platform.machine()}\n\n")
    table = ["| model | pipeline | visual tokens / image | wall ms | CPU ms | wall vs stock | CPU vs stock |",
             "|---|---|---|---|---|---|---|"]
    for kind, name, n, w, c, rw, rc in rows:
        table.append(f"| {kind} | {name} | {n} | {w:.1f} | {c:.1f} | {rw:.2f} | {rc:.2f} |")
    report = head + "\n".join(table)
    print(report)
    return report


if __name__ == "__main__":
    main()
