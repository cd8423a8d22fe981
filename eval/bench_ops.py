"""Per-operator cost: dispatched aten ops, host syncs, and CPU time against a plain batched reference.

Every registered operator runs on the same synthetic batch (default 8 images x 576 tokens x 1024 fp32
features on a 24x24 grid, with the signals its ``requires`` names) at ``keep=64`` where it takes one
(GlobalCom²: its default ratio 0.25, i.e. 144), plus ``hired`` and ``globalcom2`` on a LLaVA-NeXT
batch (8 images of 5 partitions x 576 tokens, 2x2 crops, mixed aspect ratios). For each one:

- **ops / syncs**: aten ops dispatched and host syncs (``.item()``, ``bool(t)``, ``nonzero``,
  data-dependent shapes...) of one call, counted with a ``TorchDispatchMode``
  (``vtc/ops/opcount.py``); deterministic, so ``tests/ops/test_dispatch_counts.py`` gates them.
  *fast*: inside a pipeline in ``validate=False`` mode (what ``vtc.apply`` uses after its first
  call); *entry*: the pipeline's one input check (``Pipeline.check_input``); *direct*: the operator
  called on its own (entry check + operator).
- **CPU ms**: median process CPU time of ``--repeats`` calls, measured alternately with a plain
  batched torch implementation written in this file (``REFS``: what a user would write for that
  method alone: no padding, no partitions, no bookkeeping of index/size/signals beyond the output),
  so the ratio *op / ref* is robust to the machine's load. Torch runs on one thread.

``--before REV`` measures the same operators with the ``vtc`` package of git revision ``REV`` (for
instance ``main``) in a subprocess of the same run, each with its own side-by-side reference, and
prints a before/after table. (Before this file's revision, operators had no fast mode: *before* is
always a direct call.)

**Per prefill** (``--what prefill``): what ``vtc.apply`` adds to one forward of the tiny random
LLaVA and LLaVA-NeXT (``vtc.models.random``, 24x24 patch grids, 24 tower layers) on a batch of
two images of different aspect ratios: dispatched ops and host syncs of the wrapped call minus
those of the stock call on the same inputs, on the first call (which validates the pipeline's
input and builds the geometry tables of the batch's layouts) and on the next (steady state).
``identity`` is the integration alone; the other pipelines add their operators' own counts (the
table above; with images of different sizes they see padded batches, where a data-dependent count
costs a sync). Deterministic; ``tests/integrations/test_apply_overhead.py`` gates them. *Before*
(``--before REV``) has no validate-once path: its every call is counted.

Run: ``python eval/bench_ops.py --before main`` (about a minute) or ``python eval/bench_ops.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _opcount():
    """``vtc/ops/opcount.py`` of this tree, loaded by path (so a baseline ``vtc`` can be counted too)."""
    spec = importlib.util.spec_from_file_location("_vtc_opcount", ROOT / "vtc" / "ops" / "opcount.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------- plain batched references
def ref_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def ref_divprune(x, sig, k):
    """Batched DivPrune: cosine distance, 2nd-smallest per column, farthest-point greedy with a running min."""
    xn = x / x.norm(dim=-1, keepdim=True)
    d = 1 - xn @ xn.transpose(1, 2)
    rows = torch.arange(x.shape[0])
    pick = d.topk(2, dim=1, largest=False).values[:, 1].argmax(1)
    picks, mind = [pick], d[rows, pick]
    for _ in range(k - 1):
        pick = mind.argmax(1)
        picks.append(pick)
        mind = torch.minimum(mind, d[rows, pick])
    return ref_gather(x, torch.stack(picks, 1).sort(1).values)


def ref_topk(scores, x, k, keep_score_order=False):
    idx = scores.topk(k, dim=1).indices
    return ref_gather(x, idx if keep_score_order else idx.sort(1).values)


def ref_vtc_cls(x, sig, k):
    return ref_topk(torch.stack([sig["cls_attn"][l] for l in range(16, 23)]).sum(0), x, k)


def ref_random(x, sig, k):
    h = (torch.arange(x.shape[1]).expand(x.shape[0], -1) + 0) & 0xFFFFFFFF
    for _ in range(2):
        h = (((h >> 16) ^ h) * 0x45D9F3B) & 0xFFFFFFFF
    return ref_topk((h >> 16) ^ h, x, k)


def ref_uniform(x, sig, k):
    side = math.isqrt(x.shape[1])
    g = math.isqrt(k)
    cells = [((2 * i + 1) * side // (2 * g)) * side + (2 * j + 1) * side // (2 * g) for i in range(g) for j in range(g)]
    return x[:, torch.tensor(cells)]


def ref_pool(x, sig, k):
    B, N, D = x.shape
    side, g = math.isqrt(N), math.isqrt(k)
    y = F.avg_pool2d(x.view(B, side, side, D).permute(0, 3, 1, 2), side // g)
    return y.permute(0, 2, 3, 1).reshape(B, g * g, D)


def ref_tome(x, sig, k):
    """ToMe's batched bipartite soft matching with size-weighted merges, iterated to ``k`` tokens."""
    size = torch.ones(*x.shape[:2], 1, dtype=x.dtype)
    while x.shape[1] > k:
        r = min(x.shape[1] - k, x.shape[1] // 2)
        m = x / x.norm(dim=-1, keepdim=True)
        node_max, node_idx = (m[:, ::2] @ m[:, 1::2].transpose(1, 2)).max(-1)
        edge = node_max.argsort(-1, descending=True)[..., None]
        unm, src_i = edge[:, r:], edge[:, :r]
        dst_i = node_idx[..., None].gather(1, src_i)

        def merge(t, unm=unm, src_i=src_i, dst_i=dst_i):
            c = t.shape[-1]
            src, dst = t[:, ::2], t[:, 1::2]
            kept = src.gather(1, unm.expand(-1, -1, c))
            dst = dst.scatter_reduce(1, dst_i.expand(-1, -1, c), src.gather(1, src_i.expand(-1, -1, c)), "sum")
            return torch.cat([kept, dst], 1)

        x, size = merge(x * size), merge(size)
        x = x / size
    return x


def ref_hired(x, sig, k):
    return ref_topk(sig["cls_attn"][22], x, k)


def ref_globalcom2(x, sig, k):
    return ref_topk(sig["cls_logits"][23], x, x.shape[1] // 4, keep_score_order=True)


REFS = {"divprune": ref_divprune, "vtc-cls": ref_vtc_cls, "random": ref_random, "uniform": ref_uniform,
        "pool": ref_pool, "m3": ref_pool, "tome": ref_tome, "hired": ref_hired, "globalcom2": ref_globalcom2}


# ---------------------------------------------------------------------- workloads
def clip_l():
    """CLIP-L/336's layers as LLaVA reads them (24 layers, features from 22), where this vtc knows layer
    spaces: operators' tower-relative default layers (``"feature"``, ``"last"``) resolve against it."""
    try:
        from vtc.taps.layers import LayerSpace
    except ImportError:  # a revision before layer spaces: layers are numbers
        return None
    return LayerSpace(24, 22)


def make_signals(requires: dict, B: int, N: int, g: torch.Generator) -> dict:
    space = clip_l()
    signals: dict = {}
    for name, layers in requires.items():
        per = {}
        for layer in (layers if space is None else space.resolve_all(layers)):
            if name in ("cls_attn", "attn_received"):
                per[layer] = torch.randn(B, N, generator=g).softmax(-1)
            elif name == "keys":
                per[layer] = torch.randn(B, N, 64, generator=g)
            else:
                per[layer] = torch.randn(B, N, generator=g)
        signals[name] = per
    return signals


def _space() -> dict:
    space = clip_l()
    return {} if space is None else {"layer_space": space}


def llava_tokens(vtc, requires, batch, side, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = side * side
    return vtc.VisualTokens(x=torch.randn(batch, n, dim, generator=g), signals=make_signals(requires, batch, n, g),
                            layout=vtc.Layout.grid(side), **_space())


SIZES = [(336, 672), (672, 336), (672, 672), (500, 640), (640, 480), (1000, 800), (300, 700), (672, 600)]


def anyres_tokens(vtc, requires, batch, side, dim, seed=0):
    """LLaVA-NeXT 2x2 crops (5 partitions), every crop token present (as hired's official code sees them)."""
    g = torch.Generator().manual_seed(seed)
    P, n = 5, side * side
    lays = [vtc.Layout.for_anyres(side, (2, 2), image_size=SIZES[b % len(SIZES)]) for b in range(batch)]
    group = (torch.arange(P * n) // n).expand(batch, -1)
    return vtc.VisualTokens(x=torch.randn(batch, P * n, dim, generator=g), group=group, layout=lays,
                            signals=make_signals(requires, batch, P * n, g), **_space())


def build_op(vtc, name: str, keep: int, dim: int):
    from vtc.registry import get_op

    if name == "mqt":  # a fresh MQT-LLaVA-shaped projector for the batch's width
        return vtc.create(name, keep=keep, weights=None, dim=dim, out_dim=4096, heads=16, queries=256)
    if name == "globalcom2":
        return vtc.create(name)
    if name == "visionzip":  # its official mode needs the tower's CLS token among the tokens
        return vtc.create(name, keep=keep, compat="clean")
    fields = {f.name for f in dataclasses.fields(get_op(name).Config)}
    return vtc.create(name, keep=keep) if "keep" in fields else vtc.create(name)


def workloads(vtc, args):
    """``(label, op, tokens, reference or None)`` for every operator and the LLaVA-NeXT rows."""
    from vtc.registry import get_op

    out = []
    for name in (args.ops or vtc.list_ops()):
        if getattr(get_op(name), "default_stage", None) == "llm_layer":
            continue  # runs inside the language model on a LayerContext, not on VisualTokens
        try:
            op = build_op(vtc, name, args.keep, args.dim)
        except Exception as e:  # noqa: BLE001 - e.g. an operator that needs model sizes to build
            out.append((name, e, None, None))
            continue
        out.append((name, op, llava_tokens(vtc, op.requires, args.batch, args.side, args.dim), REFS.get(name)))
    for name, spec in (("hired", "hired"), ("globalcom2", "globalcom2")):
        if args.ops and name not in args.ops:
            continue
        op = vtc.build(spec)[0]
        out.append((f"{name} (NeXT 2x2)", op, anyres_tokens(vtc, op.requires, args.batch, args.side, args.dim), None))
    return out


# ---------------------------------------------------------------------- measuring
def cpu_ms(fn, warmup: int, repeats: int, other=None) -> tuple[float, float | None]:
    """Median process CPU ms of ``fn`` (and of ``other``, timed alternately with it)."""
    for _ in range(warmup):
        fn()
        if other is not None:
            other()
    a, b = [], []
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        a.append(time.process_time() - c0)
        if other is not None:
            c0 = time.process_time()
            other()
            b.append(time.process_time() - c0)
    return 1e3 * statistics.median(a), (1e3 * statistics.median(b) if b else None)


def worker(args) -> list[dict]:
    import vtc

    count_ops = _opcount().count_ops
    has_fast = hasattr(vtc.pipeline.Pipeline, "run_op")
    rows = []
    with torch.inference_mode():
        for label, op, tokens, ref in workloads(vtc, args):
            if isinstance(op, Exception):
                rows.append({"operator": label, "error": f"{type(op).__name__}: {op}"})
                continue
            row = {"operator": label, "config": str(vtc.build(op))}
            try:
                pipe = vtc.build(op)
                def direct(op=op, tokens=tokens):
                    return op(tokens)

                def fast(pipe=pipe, op=op, tokens=tokens):
                    return pipe.run_op(0, tokens, fast=True) if has_fast else op(tokens)

                out = direct()
                fast()
                row["tokens_out"] = sorted(set(out.counts.tolist()))
                _, c = count_ops(direct)
                row["direct"] = {"ops": c.ops, "syncs": c.syncs}
                _, c = count_ops(fast)
                row["fast"] = {"ops": c.ops, "syncs": c.syncs, "sync_names": dict(c.sync_names)}
                if has_fast:
                    _, c = count_ops(pipe.check_input, tokens)
                    row["entry"] = {"ops": c.ops, "syncs": c.syncs}
                x, sig = tokens.x, tokens.signals
                refcall = (lambda ref=ref, x=x, sig=sig: ref(x, sig, args.keep)) if ref is not None else None
                row["fast"]["ms"], row["ref_ms"] = cpu_ms(fast, args.warmup, args.repeats, refcall)
                row["direct"]["ms"], _ = cpu_ms(direct, 1, max(3, args.repeats // 2))
            except Exception as e:  # one operator's failure must not hide the others' numbers
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
    return rows


PREFILL = {"llava": ["identity", "random:keep=64", "divprune:keep=64"],
           "llava_next": ["identity", "random:keep=64", "divprune:keep=64", "hired:ratio=0.2", "globalcom2"]}


def prefill_inputs(model_kind: str):
    """``(model, processor inputs)``: a tiny random model and two noise images of different aspect ratios."""
    import numpy as np
    from PIL import Image

    from vtc.models import random as rnd

    model, proc = (rnd.random_llava if model_kind == "llava" else rnd.random_llava_next)(vision_layers=24)
    g = np.random.default_rng(0)
    images = [Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((96, 96), (100, 260))]
    text = ["user : <image> what is this ? assistant :", "<image> describe the picture"]
    return model, proc(images=images, text=text, return_tensors="pt", padding=True)


def prefill_rows(vtc, args) -> list[dict]:
    """Ops and syncs of one prefill with and without ``vtc.apply`` (see the module docstring)."""
    count_ops = _opcount().count_ops
    rows = []
    for kind, specs in PREFILL.items():
        model, inputs = prefill_inputs(kind)

        def forward(model=model, inputs=inputs):
            return model(**inputs)

        with torch.inference_mode():
            forward()
            _, stock = count_ops(forward)
            for spec in specs:
                row = {"kind": "prefill", "model": kind, "pipeline": spec, "stock": {"ops": stock.ops, "syncs": stock.syncs}}
                try:
                    with vtc.apply(model, spec):
                        _, first = count_ops(forward)
                        _, steady = count_ops(forward)
                    for name, c in (("first", first), ("steady", steady)):
                        row[name] = {"ops": c.ops - stock.ops, "syncs": c.syncs - stock.syncs}
                except Exception as e:  # noqa: BLE001 - one pipeline's failure must not hide the others
                    row["error"] = f"{type(e).__name__}: {e}"
                rows.append(row)
    return rows


def print_prefill(after: list[dict], before: list[dict] | None) -> None:
    by = {(r["model"], r["pipeline"]): r for r in before or []}
    print("\n| model | pipeline | stock ops / syncs | ops added (before → after) | after, first call | "
          "syncs added (before → after) | after, first call |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in after:
        if "error" in r:
            print(f"| {r['model']} | `{r['pipeline']}` | error: {r['error']} |")
            continue
        b = by.get((r["model"], r["pipeline"]), {})
        bo = f"{b['steady']['ops']} → " if "steady" in b else ""
        bs = f"{b['steady']['syncs']} → " if "steady" in b else ""
        print(f"| {r['model']} | `{r['pipeline']}` | {r['stock']['ops']} / {r['stock']['syncs']} | "
              f"{bo}{r['steady']['ops']} | {r['first']['ops']} | {bs}{r['steady']['syncs']} | {r['first']['syncs']} |")


def run_worker(args, src: Path) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), "--batch", str(args.batch),
               "--side", str(args.side), "--dim", str(args.dim), "--keep", str(args.keep), "--warmup",
               str(args.warmup), "--repeats", str(args.repeats), "--threads", str(args.threads), "--what", args.what]
        if args.ops:
            cmd += ["--ops", *args.ops]
        env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1")
        subprocess.run(cmd, check=True, env=env, cwd=tmp)
        return json.loads(out.read_text())


def checkout(rev: str, dest: Path) -> Path:
    """The ``vtc`` package of git revision ``rev`` under ``dest``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "vtc"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _f(v, fmt="{:.2f}") -> str:
    return "" if v is None else fmt.format(v)


def print_table(after: list[dict], before: list[dict] | None) -> None:
    by = {r["operator"]: r for r in before or []}
    if before is None:
        print("| operator | config | out / image | ops fast | syncs fast | entry ops/syncs | direct ops/syncs "
              "| ref ms | op ms (fast) | op / ref |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    else:
        print("| operator | out / image | ops before → after | syncs before → after | entry ops/syncs | ref ms "
              "| before ms | after ms | before / ref | after / ref |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in after:
        if "error" in r:
            print(f"| {r['operator']} | error: {r['error']} |")
            continue
        ref, fast = r.get("ref_ms"), r["fast"]
        entry = f"{r['entry']['ops']}/{r['entry']['syncs']}" if "entry" in r else ""
        outs = ",".join(map(str, r["tokens_out"]))
        if before is None:
            print(f"| {r['operator']} | `{r['config']}` | {outs} | {fast['ops']} | {fast['syncs']} | {entry} | "
                  f"{r['direct']['ops']}/{r['direct']['syncs']} | {_f(ref)} | {_f(fast['ms'])} | "
                  f"{_f(fast['ms'] / ref if ref else None)} |")
            continue
        b = by.get(r["operator"], {})
        if "error" in b or not b:
            bops = bsync = bms = bratio = ""
        else:
            bops, bsync, bms = b["direct"]["ops"], b["direct"]["syncs"], b["fast"]["ms"]
            bratio = _f(bms / b["ref_ms"] if b.get("ref_ms") else None)
        print(f"| {r['operator']} | {outs} | {bops} → {fast['ops']} | {bsync} → {fast['syncs']} | {entry} | {_f(ref)} | "
              f"{_f(bms) if bms != '' else ''} | {_f(fast['ms'])} | {bratio} | {_f(fast['ms'] / ref if ref else None)} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--side", type=int, default=24, help="grid side: tokens per image (partition) = side**2")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--ops", nargs="*", default=None, help="operator names (default: every registered one)")
    ap.add_argument("--what", choices=["ops", "prefill", "all"], default="all",
                    help="operator calls, vtc.apply per prefill, or both")
    ap.add_argument("--before", metavar="REV", help="also measure the vtc of this git revision (e.g. main)")
    ap.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    ap.add_argument("--worker", metavar="FILE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        import vtc

        rows = worker(args) if args.what in ("ops", "all") else []
        rows += prefill_rows(vtc, args) if args.what in ("prefill", "all") else []
        Path(args.worker).write_text(json.dumps(rows))
        return
    before = None
    if args.before:
        with tempfile.TemporaryDirectory() as tmp:
            before = run_worker(args, checkout(args.before, Path(tmp)))
    after = run_worker(args, ROOT)
    import vtc

    print(f"vtc {vtc.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads or torch.get_num_threads()} torch thread(s); batch {args.batch} x {args.side ** 2} tokens x "
          f"{args.dim} fp32 (NeXT rows: x5 partitions), keep={args.keep}; CPU ms = median of {args.repeats}"
          + (f"; before = {args.before}" if args.before else "") + "\n")
    def split(rows):
        return ([r for r in rows or [] if r.get("kind") != "prefill"],
                [r for r in rows or [] if r.get("kind") == "prefill"])

    (ops_after, pre_after), (ops_before, pre_before) = split(after), split(before)
    if ops_after:
        print_table(ops_after, ops_before if before is not None else None)
    if pre_after:
        print_prefill(pre_after, pre_before if before is not None else None)
    if args.json:
        Path(args.json).write_text(json.dumps({"after": after, "before": before}, indent=1))


if __name__ == "__main__":
    main()
