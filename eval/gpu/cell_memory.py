# budget: 60
"""Per-cell peak memory on CUDA: the bench's CellMemory around each cell of a small run.

Runs the embedded tiny-llava on its shapes test questions, uncompressed and with divprune at 64
and 16 tokens, at one batch size, and records each cell's ``memory`` (``torch.cuda
.max_memory_allocated`` after a reset at the cell's start; ``base`` = allocated at the start).
Checks: the kind is ``cuda_max_allocated``, every peak is at least its base, and fewer visual
tokens never need more memory than the uncompressed cell. ``--device cpu --smoke`` runs the same
on a CPU with four questions (the figures are then RSS growth).

    python eval/gpu/cell_memory.py --out runs/gpu/cell_memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    from vtc.bench.runner import run

    root = Path(__file__).resolve().parents[1]
    limit, batch = (4, 4) if args.smoke else (48, 24)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"name": "cell_memory", "output": tmp, "latency": False, "batch_size": batch, "limit": limit,
               "models": [{"name": "tiny-llava", "source": "tiny", "path": "tiny-llava", "device": args.device,
                           "dtype": "float32", "chat": "USER: <image>\n{prompt} ASSISTANT:"}],
               "tasks": [str(root / "tasks" / "tiny_shapes.yaml")],
               "pipelines": ["divprune:keep={budget}"], "budgets": [64, 16]}
        out = run(cfg, progress=False)
        cells = {}
        for p in sorted((out / "cells").glob("*.json")):
            meta = json.loads(p.read_text())
            cells[f"{meta['method']}@{meta['budget']}"] = meta.get("memory")
    kinds = {m["kind"] for m in cells.values()}
    base = cells["baseline@None"]["peak_bytes"]
    checks = {
        "kind": kinds == ({"cuda_max_allocated"} if args.device.startswith("cuda") else kinds),
        "peak_at_least_base": all(m["peak_bytes"] >= (m["base_bytes"] or 0) for m in cells.values())
        if args.device.startswith("cuda") else True,
        "compressed_not_above_uncompressed": all(m["peak_bytes"] <= base for k, m in cells.items() if k != "baseline@None"),
    }
    result = {"device": args.device, "smoke": args.smoke, "questions": limit, "batch": batch,
              "cells": {k: {"peak_mib": m["peak_bytes"] / 2**20,
                            "base_mib": None if m["base_bytes"] is None else m["base_bytes"] / 2**20, "kind": m["kind"]}
                        for k, m in cells.items()},
              "checks": checks, "ok": all(checks.values())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
