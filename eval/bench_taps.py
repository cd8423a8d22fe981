"""Tap overhead: a vision tower's forward with vs without a vtc tap, per signal set, measured side by side.

Towers (random weights, their default SDPA attention):

- ``--family hf`` (default): a Hugging Face ``CLIPVisionModel`` shaped like LLaVA's
  ``openai/clip-vit-large-patch14-336`` (24 layers, width 1024, 16 heads, 336 px / 14 px patches =
  577 tokens); ``open_clip`` / ``timm``: the same shape in those libraries. Feature layer -2 (LLaVA).
- ``--family qwen2.5``: a Qwen2.5-VL-7B-shaped vision tower (32 layers, width 1280, 16 heads,
  window attention except layers 7/15/23/31, 2x2 merger) on one ``--image``-pixel square image.

Signal sets (``--signals``, default: every one the tower can give):

- ``cls``: what VTC-CLS and a keys-based merger read, ``cls_attn`` at layers 16..22 and ``keys`` at
  layer 22 (CLIP towers only);
- ``attn_received``: HiPrune's two readings, layer 8 and the feature layer (chunked over query rows);
- ``key_norms``: the feature layer.

For each device (CPU; CUDA when available, in float16) and batch size, forwards without a tap and
with each signal set run in rotating order (so drift hits all alike) after warm-up; each row gives
the median time without and with that tap, the ratio of medians, the median of per-round ratios,
and the time spent inside the tap's hooks (on CUDA the host-side launch time; kernels run
asynchronously).

    python eval/bench_taps.py                                  # CPU (and CUDA if present), batch 1 and 8
    python eval/bench_taps.py --batch 1 --signals cls --signals attn_received
    python eval/bench_taps.py --family qwen2.5 --image 224 --batch 1
    python eval/bench_taps.py --batch 1 --threads 1 --clock process  # a shared CPU: count this process's time
    python eval/bench_taps.py --device cuda --repeats 20 --json taps.json

CPU runs are slow (a ViT-L/336 forward is ~0.4 TFLOP), so the CPU defaults use few repeats and
batch 8 gets one round; on a shared machine CPU ratios are dominated by noise from other processes.
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

#: signal sets by name; "feature" is the tower's feature layer (CLIP: -2 as in LLaVA; Qwen: the last)
SIGNAL_SETS = {
    "cls": {"cls_attn": list(range(16, 23)), "keys": [22]},
    "attn_received": {"attn_received": [8, "feature"]},
    "key_norms": {"key_norms": ["feature"]},
}
CLS_FREE_SETS = ("attn_received", "key_norms")


def build_tower(device: str, dtype: torch.dtype, family: str = "hf"):
    """A ViT-L/14-336-shaped tower (HF CLIPVisionModel, open_clip, timm) or a Qwen2.5-VL-7B-shaped one, random."""
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
    elif family == "qwen2.5":
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        cfg = Qwen2_5_VLVisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                                     spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                                     fullatt_block_indexes=[7, 15, 23, 31])
        tower = Qwen2_5_VisionTransformerPretrainedModel(cfg)
    else:
        raise SystemExit(f"unknown --family {family!r}; use hf, open_clip, timm or qwen2.5")
    return tower.to(device=device, dtype=dtype).eval()


def make_inputs(family: str, batch: int, image: int, device: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Positional and keyword arguments of one forward of ``batch`` images."""
    g = torch.Generator().manual_seed(batch)
    if family == "qwen2.5":
        side = image // 14 // 2 * 2  # patches per side, a multiple of the 2x2 merge
        grid = torch.tensor([[1, side, side]] * batch)
        px = torch.randn(int(grid.prod(1).sum()), 3 * 2 * 14 * 14, generator=g).to(device=device, dtype=dtype)
        return (px,), {"grid_thw": grid.to(device)}
    return (torch.randn(batch, 3, 336, 336, generator=g).to(device=device, dtype=dtype),), {}


class _Clock:
    """CUDA events on a GPU; on CPU wall time, or this process's CPU time (``process=True``), which other
    processes on a shared machine barely disturb (use it with ``--threads 1``)."""

    def __init__(self, device: str, process: bool = False) -> None:
        self.cuda = device.startswith("cuda")
        self.now = time.process_time if process else time.perf_counter

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        t = self.now()
        fn()
        return self.now() - t


def _instrument(tap, spent: list[float], now=time.perf_counter) -> None:
    """Add the host time (``now``'s) spent inside every hook the tap installed to ``spent[0]``."""
    for handle in tap._handles:
        hooks = handle.hooks_dict_ref()
        if hooks is None or handle.id not in hooks:
            continue
        inner = hooks[handle.id]

        def timed(*a, _inner=inner, **kw):
            t = now()
            try:
                return _inner(*a, **kw)
            finally:
                spent[0] += now() - t

        hooks[handle.id] = timed


def bench(device: str, batch: int, repeats: int, warmup: int, dtype: torch.dtype, tower, family: str,
          sets: list[str], image: int = 336, process_clock: bool = False) -> list[dict]:
    args, kwargs = make_inputs(family, batch, image, device, dtype)
    clock = _Clock(device, process_clock)
    feature = None if family == "qwen2.5" else -2  # LLaVA reads layer 22 of 24; Qwen's tower knows its own
    spent = [0.0]

    def run(name: str | None) -> float:
        tap = attach(tower, SIGNAL_SETS[name], feature_layer=feature) if name else None
        if tap is not None:
            _instrument(tap, spent, clock.now)
        try:
            with torch.inference_mode():
                t = clock(lambda: tower(*args, **kwargs))
            if tap is not None and any(len(tap.signals.get(s, {})) != len(ls) for s, ls in tap.requires.items()):
                raise RuntimeError(f"the tap recorded {tap.signals.keys()} instead of {tap.requires}")
            return t
        finally:
            if tap is not None:
                tap.remove()

    variants: list[str | None] = [None, *sets]
    for _ in range(warmup):
        for v in variants:
            run(v)
    times: dict[str | None, list[float]] = {v: [] for v in variants}
    hook: dict[str, list[float]] = {v: [] for v in sets}
    ratios: dict[str, list[float]] = {v: [] for v in sets}
    for i in range(repeats):
        order = variants[i % len(variants):] + variants[:i % len(variants)]
        this = {}
        for v in order:
            spent[0] = 0.0
            this[v] = run(v)
            if v is not None:
                hook[v].append(spent[0])
        for v in variants:
            times[v].append(this[v])
        for v in sets:
            ratios[v].append(this[v] / this[None])
    mb = statistics.median(times[None])
    rows = []
    for v in sets:
        mt = statistics.median(times[v])
        rows.append({
            "family": family, "device": device, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "signals": v, "requires": SIGNAL_SETS[v], "repeats": repeats, "warmup": warmup,
            "clock": "cuda events" if clock.cuda else ("process cpu time" if process_clock else "wall"),
            "tokens_per_image": (image // 14 // 2 * 2) ** 2 if family == "qwen2.5" else 577,
            "median_s_without": mb, "median_s_with": mt, "ratio_of_medians": mt / mb,
            "median_pair_ratio": statistics.median(ratios[v]), "tap_compute_s": statistics.median(hook[v]),
            "tap_compute_share": statistics.median(hook[v]) / mb, "times_without": times[None], "times_with": times[v],
        })
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", action="append", help="cpu and/or cuda (default: cpu, plus cuda if available)")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default: 1 and 8)")
    ap.add_argument("--repeats", type=int, default=None, help="measured rounds per cell (default: cuda 30; cpu 3 at "
                    "batch 1, 1 above)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds per cell (default: cuda 5; cpu 1 at the "
                    "first batch size, 0 after)")
    ap.add_argument("--family", default="hf", help="hf (default), open_clip, timm or qwen2.5")
    ap.add_argument("--signals", action="append", choices=sorted(SIGNAL_SETS),
                    help="signal sets to time (default: all the tower can give)")
    ap.add_argument("--image", type=int, default=336, help="qwen2.5: image side in pixels (default 336)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="CPU timing: wall time (default) or this process's CPU time (shared machines; with --threads 1)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = args.signals or (list(CLS_FREE_SETS) if args.family == "qwen2.5" else list(SIGNAL_SETS))
    if args.family == "qwen2.5" and "cls" in sets:
        raise SystemExit("the Qwen2.5-VL tower has no CLS token: --signals attn_received / key_norms")
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
            for row in bench(device, b, reps, warm, dtype, tower, args.family, sets, args.image, args.clock == "process"):
                rows.append(row)
                print(f"{args.family:9s} {device:5s} {row['dtype']:8s} batch {b:2d} {row['signals']:13s}: "
                      f"without {row['median_s_without'] * 1e3:9.2f} ms  with {row['median_s_with'] * 1e3:9.2f} ms  "
                      f"ratio {row['ratio_of_medians']:.4f}  (per round {row['median_pair_ratio']:.4f}, n={reps})  "
                      f"tap hooks {row['tap_compute_s'] * 1e3:.3f} ms = {row['tap_compute_share'] * 100:.3f}% of the "
                      "forward", flush=True)
        del tower
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    print("env:", json.dumps(env))
    if args.json:
        args.json.write_text(json.dumps({"env": env, "signal_sets": SIGNAL_SETS, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
