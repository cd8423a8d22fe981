"""Tap overhead: a vision tower's forward with vs without a vtc tap, measured side by side in one run.

The tower is a Hugging Face ``CLIPVisionModel`` shaped like LLaVA's ``openai/clip-vit-large-patch14-336``
(24 layers, width 1024, 16 heads, 336 px / 14 px patches = 577 tokens) with random weights and its
default SDPA attention (``--family open_clip`` / ``timm``: the same shape in those libraries). The
tap records what VTC-CLS and a keys-based merger need: ``cls_attn`` at layers 16..22 and ``keys`` at
layer 22.

For each device (CPU; CUDA when available, in float16) and batch size, forwards with and without the
tap alternate (ABAB..., so drift hits both alike) after warm-up; the report gives the median time of
each, their ratio, the median of per-pair ratios, and the time spent inside the tap's signal
computation (on CUDA that is the host-side launch time; the kernels run asynchronously).

    python eval/bench_taps.py                      # CPU (and CUDA if present), batch 1 and 8
    python eval/bench_taps.py --device cuda --repeats 20 --json taps.json

CPU runs are slow (a ViT-L/336 forward is ~0.4 TFLOP), so the CPU defaults use few repeats and
batch 8 gets one pair; on a shared machine CPU ratios are dominated by noise from other processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vtc.taps import attach  # noqa: E402

REQUIRES = {"cls_attn": list(range(16, 23)), "keys": [22]}


def build_tower(device: str, dtype: torch.dtype, family: str = "hf"):
    """A ViT-L/14-336-shaped tower with random weights: HF CLIPVisionModel (SDPA), open_clip or timm."""
    torch.manual_seed(0)
    if family == "hf":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=336, patch_size=14, hidden_act="quick_gelu", attn_implementation="sdpa")
        tower = CLIPVisionModel(cfg)
    elif family == "open_clip":
        from open_clip.transformer import VisionTransformer

        tower = VisionTransformer(image_size=336, patch_size=14, width=1024, layers=24, heads=16, mlp_ratio=4.0,
                                  output_dim=768)
    elif family == "timm":
        import timm

        tower = timm.create_model("vit_large_patch14_clip_336", pretrained=False, num_classes=0)
    else:
        raise SystemExit(f"unknown --family {family!r}; use hf, open_clip or timm")
    return tower.to(device=device, dtype=dtype).eval()


class _Clock:
    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t


def _instrument(tap, spent: list[float]) -> None:
    """Add the host time spent in the tap's signal computation to ``spent[0]``."""
    for name in ("record_qk", "record_logits", "record_keys"):
        inner = getattr(tap, name)

        def timed(*a, _inner=inner, **kw):
            t = time.perf_counter()
            try:
                return _inner(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t

        setattr(tap, name, timed)


def bench(device: str, batch: int, repeats: int, warmup: int, dtype: torch.dtype, tower, family: str = "hf") -> dict:
    x = torch.randn(batch, 3, 336, 336, generator=torch.Generator().manual_seed(batch)).to(device=device, dtype=dtype)
    clock = _Clock(device)
    spent = [0.0]

    def run(with_tap: bool) -> float:
        tap = attach(tower, REQUIRES) if with_tap else None
        if tap is not None:
            _instrument(tap, spent)
        try:
            with torch.inference_mode():
                t = clock(lambda: tower(x))
            if tap is not None and (len(tap.signals["cls_attn"]) != 7 or 22 not in tap.signals["keys"]):
                raise RuntimeError(f"the tap recorded {tap.signals.keys()} instead of {REQUIRES}")
            return t
        finally:
            if tap is not None:
                tap.remove()

    for _ in range(warmup):
        run(False)
        run(True)
    base, tapped, ratios, hook = [], [], [], []
    for i in range(repeats):
        order = (False, True) if i % 2 == 0 else (True, False)
        times = {}
        for w in order:
            spent[0] = 0.0
            times[w] = run(w)
            if w:
                hook.append(spent[0])
        base.append(times[False])
        tapped.append(times[True])
        ratios.append(times[True] / times[False])
    mb, mt = statistics.median(base), statistics.median(tapped)
    return {
        "family": family, "device": device, "dtype": str(dtype).replace("torch.", ""), "batch": batch, "repeats": repeats,
        "warmup": warmup, "median_s_without": mb, "median_s_with": mt, "ratio_of_medians": mt / mb,
        "median_pair_ratio": statistics.median(ratios), "tap_compute_s": statistics.median(hook),
        "tap_compute_share": statistics.median(hook) / mb, "times_without": base, "times_with": tapped,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", action="append", help="cpu and/or cuda (default: cpu, plus cuda if available)")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default: 1 and 8)")
    ap.add_argument("--repeats", type=int, default=None, help="measured pairs per cell (default: cuda 30; cpu 3 at "
                    "batch 1, 1 above)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up pairs per cell (default: cuda 5; cpu 1 at the "
                    "first batch size, 0 after)")
    ap.add_argument("--family", default="hf", help="hf (default), open_clip or timm")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    batches = args.batch or [1, 8]
    rows = []
    for device in devices:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        tower = build_tower(device, dtype, args.family)
        for i, b in enumerate(batches):
            cuda = device.startswith("cuda")
            reps = args.repeats if args.repeats is not None else (30 if cuda else (3 if b == 1 else 1))
            warm = args.warmup if args.warmup is not None else (5 if cuda else (1 if i == 0 else 0))
            row = bench(device, b, reps, warm, dtype, tower, args.family)
            rows.append(row)
            print(f"{args.family:9s} {device:5s} {row['dtype']:8s} batch {b:2d}: without {row['median_s_without'] * 1e3:9.2f} ms  "
                  f"with {row['median_s_with'] * 1e3:9.2f} ms  ratio {row['ratio_of_medians']:.4f}  "
                  f"(pairwise {row['median_pair_ratio']:.4f}, n={reps})  tap compute "
                  f"{row['tap_compute_s'] * 1e3:.3f} ms = {row['tap_compute_share'] * 100:.3f}% of the forward",
                  flush=True)
        del tower
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    print("env:", json.dumps(env))
    if args.json:
        args.json.write_text(json.dumps({"env": env, "requires": REQUIRES, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
