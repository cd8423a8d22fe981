"""Command line of the embedded models: ``train``, ``eval`` and ``export``.

    python -m vtc.models.tiny train --variant tiny-llava --steps 6000 --out runs/tiny-llava --max-minutes 9
    python -m vtc.models.tiny train --variant tiny-llava --steps 6000 --out runs/tiny-llava --resume
    python -m vtc.models.tiny eval --model runs/tiny-llava/final --dataset shapes --pipeline uniform:keep=64
    python -m vtc.models.tiny export --out runs/tiny-llava --dest assets/tiny-llava
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_RECIPE_FLAGS = {"batch": int, "turns": int, "lr": float, "warmup": int, "prune_share": float, "prune_min": int,
                 "aux_weight": float, "seed": int, "original_positions_share": float,
                 "min_lr_ratio": float}


def _train(a) -> None:
    from vtc.models.tiny.train import RunConfig, train

    recipe = {k: getattr(a, k) for k in _RECIPE_FLAGS if getattr(a, k) is not None}
    train(RunConfig(variant=a.variant, steps=a.steps, out=a.out, resume=a.resume, max_minutes=a.max_minutes,
                    threads=a.threads, bf16=a.bf16, log_every=a.log_every, save_every=a.save_every, init=a.init,
                    recipe=recipe))


def _eval(a) -> None:
    import torch

    from vtc.models.tiny.datasets import dataset
    from vtc.models.tiny.evaluate import evaluate
    from vtc.models.tiny.loading import load

    torch.set_num_threads(a.threads)
    tm = load(a.model)
    items = dataset(a.dataset).items(a.split, limit=a.limit)
    m = a.queries if tm.mqt is not None else None
    if tm.mqt is not None and m is None:
        m = tm.mqt.queries
    acc = evaluate(tm.model, tm.processor, items, pipeline=a.pipeline, subset=a.subset,
                   mqt=tm.mqt if a.pipeline is None else None, m=m, positions=a.positions, batch_size=a.batch)
    label = a.pipeline or (f"random subset {a.subset}" if a.subset else f"mqt m={m}" if m else "all tokens")
    print(f"{tm.path} on {a.dataset}/{a.split} ({label}):")
    print(acc.table())
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"model": str(tm.path), "dataset": a.dataset, "split": a.split, "select": label,
                                **acc.as_dict()}) + "\n")


def _export(a) -> None:
    import torch

    from vtc.models.tiny.checkpoint import CKPT_JSON
    from vtc.models.tiny.train import RunConfig, Trainer

    info = json.loads(open(os.path.join(a.out, CKPT_JSON)).read())
    t = Trainer(RunConfig(variant=info["variant"], steps=info["steps"], out=a.out, init=a.init))
    t.load()
    dest = t.export(a.dest)
    if a.fp16:
        t.model.eval()
        from vtc.models.tiny.checkpoint import export_folder

        export_folder(dest, t.model, t.processor, t.mqt, None, dtype=torch.float16)
    print(f"exported {info['variant']} step {t.step_no} to {dest}")


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(prog="python -m vtc.models.tiny", description="vtc's embedded tiny models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train or continue a run")
    t.add_argument("--variant", required=True, choices=["tiny-llava", "tiny-llava-next", "tiny-mqt"])
    t.add_argument("--steps", type=int, required=True, help="total steps of the run (the LR schedule's length)")
    t.add_argument("--out", required=True, help="run folder (checkpoint, logs, final export)")
    t.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    t.add_argument("--max-minutes", type=float, default=None, help="stop (and checkpoint) after this long")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--bf16", action="store_true", help="bf16 autocast (measure first: eval/tiny_throughput.py)")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--init", default=None, help="start from this exported model's weights (a stage of a staged "
                   "recipe); tiny-mqt: the trained tiny-llava (default assets/tiny-llava)")
    for k, typ in _RECIPE_FLAGS.items():
        t.add_argument("--" + k.replace("_", "-"), type=typ, default=None, dest=k)
    e = sub.add_parser("eval", help="greedy answer accuracy per question type")
    e.add_argument("--model", required=True, help="variant name (assets/) or exported folder")
    e.add_argument("--dataset", default="shapes", choices=["shapes", "shapes-large", "easy-vqa"])
    e.add_argument("--split", default="test")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--pipeline", default=None, help='a vtc pipeline, e.g. "uniform:keep=64" (LLaVA only)')
    e.add_argument("--subset", type=int, default=None, help="random subset of this many visual tokens")
    e.add_argument("--queries", type=int, default=None, help="tiny-mqt: number of queries m")
    e.add_argument("--positions", default="contiguous", choices=["contiguous", "original"])
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--json", default=None, help="append the result as a JSON line to this file")
    x = sub.add_parser("export", help="write the HF folder of a run's latest checkpoint")
    x.add_argument("--out", required=True, help="run folder")
    x.add_argument("--dest", required=True, help="destination, e.g. assets/tiny-llava")
    x.add_argument("--init", default=None)
    x.add_argument("--fp16", action="store_true", help="store the weights in fp16")
    a = ap.parse_args(argv)
    {"train": _train, "eval": _eval, "export": _export}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
