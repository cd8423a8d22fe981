# budget: 90
"""GPU check: vtc.apply on a Qwen2.5-VL-shaped random model in bf16 with SDPA.

The model is a stock ``Qwen2_5_VLForConditionalGeneration`` with Qwen2.5-VL-7B's widths (tower
1280 wide, 16 heads, 14-px patches, 112-px windows, merger to 3584; decoder 3584 wide, 28 heads,
4 key/value heads, MLP 18944) and fewer layers (8 tower layers with two global ones, 4 decoder
layers), random weights, built on the device. It checks, for a batch of two prompts (one with two
images, different image sizes, left padding) under ``vtc.apply(model, PIPELINE)``:

- keep-all (``identity``) gives logits bit-identical to the unwrapped model;
- the batch equals each prompt alone: the largest difference of the last-position logits
  (relative to their scale) and whether the greedy tokens agree;
- prefill time, stock and compressed (CUDA events, medians of repeats), and the visual tokens kept.

Writes one JSON object to ``--out``. ``--device cpu --smoke`` runs a tiny model in fp32 on CPU (to
check the script works; the numbers then mean nothing).

    PYTHONPATH=. python eval/gpu/qwen_apply.py --out runs/gpu/qwen_apply.json
    PYTHONPATH=. python eval/gpu/qwen_apply.py --device cpu --smoke --out /tmp/qwen_apply.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

import vtc
from vtc.models.random import QWEN_IMAGE, QwenSpec, random_qwen2_5_vl

PIPELINE = "divprune:keep=64"  # the smoke model's images hold 16..50 tokens: it keeps 16
SEVEN_B = QwenSpec(patch_size=14, vision_hidden=1280, vision_intermediate=3420, vision_layers=8, vision_heads=16,
                   text_hidden=3584, text_layers=4, text_heads=28, text_kv_heads=4, text_intermediate=18944,
                   window=112, min_pixels=56 * 56, max_pixels=448 * 448)


def _inputs(proc, device, dtype, big: bool):
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = ((448, 336), (280, 420), (224, 224)) if big else ((48, 64), (80, 40), (32, 32))
    ims = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]
    texts = [f"user : {QWEN_IMAGE} and {QWEN_IMAGE} what is this ? assistant :", f"{QWEN_IMAGE} describe"]
    groups = [ims[:2], ims[2:]]

    def prep(t, g):
        b = proc(images=[im for per in g for im in per], text=t, return_tensors="pt", padding=True)
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in b.items()}

    return prep(texts, groups), [prep([t], [g]) for t, g in zip(texts, groups)]


def _prefill_ms(model, batch, device, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**batch)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            model(**batch)
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times[1:])  # the first run warms up


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny fp32 model (CPU check of the script)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    t0 = time.perf_counter()
    with device:
        model, proc = random_qwen2_5_vl(QwenSpec() if args.smoke else SEVEN_B)
    model = model.to(dtype).eval()
    model.set_attn_implementation("sdpa")
    batch, alone = _inputs(proc, device, dtype, big=not args.smoke)
    pipeline = "divprune:keep=16" if args.smoke else PIPELINE
    result = {"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
              "dtype": str(dtype), "smoke": args.smoke, "pipeline": pipeline, "build_s": time.perf_counter() - t0,
              "images": batch["image_grid_thw"].tolist(), "prompt_tokens": list(batch["input_ids"].shape)}
    ref = model(**batch).logits
    with vtc.apply(model, "identity"):
        same = model(**batch).logits
    result["keep_all_bit_identical"] = bool(torch.equal(same, ref))
    gen = dict(max_new_tokens=8, do_sample=False)
    with vtc.apply(model, pipeline) as h:
        out = model(**batch).logits[:, -1].float()
        result["kept"], result["stock"] = h.last.counts, h.last.stock_counts
        g_batch = model.generate(**batch, **gen)
        L = batch["input_ids"].shape[1]
        diffs, agree = [], []
        for b, one in enumerate(alone):
            o = model(**one).logits[0, -1].float()
            diffs.append(float((out[b] - o).abs().max() / o.abs().max().clamp_min(1e-6)))
            g_one = model.generate(**one, **gen)[0, one["input_ids"].shape[1]:]
            agree.append(bool(torch.equal(g_batch[b, L:L + len(g_one)], g_one)))
        result["per_sample_max_rel_logit_diff"] = diffs
        result["per_sample_greedy_equal"] = agree
        result["prefill_ms_compressed"] = _prefill_ms(model, batch, device, args.repeats)
    result["prefill_ms_stock"] = _prefill_ms(model, batch, device, args.repeats)
    result["runs"] = True
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
