# budget: 150
"""GPU cost of the operators against a 7B-shaped LLaVA prefill (issue 15's P1 and P2 figures).

On a LLaVA-1.5-7B-shaped model with random weights (CLIP-L/14-336 tower, 24 layers; a Vicuna-7B-wide
Llama: hidden 4096, FFN 11008, 32 heads, built with ``--layers`` of its 32 decoder layers so the run
fits its budget; fp16; a small vocabulary, so the LM head is cheaper than the real 32000-word one),
batch 8, one 336px image and a ~60-word prompt per sample:

- **P1** per operator: its GPU time (CUDA events, median; inside a pipeline's ``validate=False``
  mode, as ``vtc.apply`` runs it after its first call; vision-stage operators on ``[8, 576, 1024]``
  tower tokens, llm-stage ones on ``[8, 576, 4096]`` projector outputs) divided by the pruned
  prefill (the language model on the sequence with 64 visual tokens). Goal: <= 2%.
- **P2**: the end-to-end prefill speedup of ``vtc.apply(model, "divprune:keep=64")`` (576 -> 64)
  against the ideal one (the same model, tower and projector included, with the operator and the
  compaction free): ``P2 = T_ideal / T_vtc`` with ``T_ideal = T_stock - T_lm(576) + T_lm(64)``.
  Goal: >= 90%.

Both are reported as measured (``--layers`` decoder layers) and scaled to the full 32 layers: the
decoder's time is linear in its depth, so ``T_lm(32) = T_lm(L) * 32 / L`` while the tower, the
projector and the operator do not change; the scaled figures are the ones to compare with the goals.
Also reported: DivPrune's greedy loop eager vs ``torch.compile`` (same picks required).

Run on a GPU: ``PYTHONPATH=. python eval/gpu/ops.py --out ops.json`` (from ``eval/gpu_check.sh``).
Check it on a CPU: ``python eval/gpu/ops.py --device cpu --smoke --out /tmp/ops.json`` (tiny model).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import vtc  # noqa: E402
from vtc.models.random import TinySpec, random_llava  # noqa: E402

WORDS = ("user : describe the picture . what is the color of the large object in the image and how many small "
         "objects are there ? is there a red circle above the blue square on the left ? answer with a single "
         "word or two . assistant :").split()


def timer(device: torch.device):
    """``measure(fn, warmup, repeats) -> median ms`` with CUDA events on a GPU, wall clock on a CPU."""
    def measure(fn, warmup: int = 3, repeats: int = 10) -> float:
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(repeats):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                out.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                out.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(out)
    return measure


def build(args, device: torch.device, dtype: torch.dtype):
    if args.smoke:
        spec = TinySpec(text_layers=args.layers, seed=0)
    else:
        spec = TinySpec(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
                        text_hidden=4096, text_layers=args.layers, text_heads=32, text_kv_heads=32,
                        text_intermediate=11008, seed=0)
    with torch.device(device):
        model, proc = random_llava(spec)
    model = model.to(device=device, dtype=dtype).eval()
    import numpy as np

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (spec.image_size, spec.image_size, 3), dtype=np.uint8) for _ in range(args.batch)]
    text = " ".join(WORDS[:WORDS.index(":") + 1] + ["<image>"] + WORDS[WORDS.index(":") + 1:])
    inputs = proc(images=images, text=[text] * args.batch, return_tensors="pt")
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    return model, spec, inputs


def lm_time(model, inputs, measure, keep_visual: int | None) -> tuple[float, int]:
    """The language model alone on the prompt's embeddings with ``keep_visual`` of the image tokens."""
    lm = model.model.language_model
    ids = inputs["input_ids"]
    img = ids == model.config.image_token_id
    if keep_visual is not None:
        drop = img & (img.cumsum(1) > keep_visual)
        ids = ids[~drop].view(ids.shape[0], -1)
    emb = lm.get_input_embeddings()(ids)
    mask = torch.ones(ids.shape, dtype=torch.long, device=ids.device)
    with torch.inference_mode():
        return measure(lambda: lm(inputs_embeds=emb, attention_mask=mask, use_cache=False)), ids.shape[1]


def _bench_ops():
    """eval/bench_ops.py, for its operator construction and signal builders (one definition of each)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench_ops.py"
    mod_spec = importlib.util.spec_from_file_location("vtc_eval_bench_ops", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def op_times(args, device, dtype, measure, spec) -> dict:
    """Every pre-LLM operator at keep=64 (GlobalCom2 at its default ratio), built and fed as
    eval/bench_ops.py does: CLIP-L's layer space, random signals; in-LLM operators are skipped (they
    run on a LayerContext inside the decoder; eval/gpu/llm_layer.py times them)."""
    from vtc.registry import get_op

    bo = _bench_ops()
    side = spec.image_size // spec.patch_size
    n = side * side
    out = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    for name in vtc.list_ops():
        if name == "mqt" or getattr(get_op(name), "default_stage", None) == "llm_layer":
            continue
        probe = bo.build_op(vtc, name, 64, 64)
        dim = 4096 if (probe.stage == "llm" and not args.smoke) else (1024 if not args.smoke else 64)
        op = bo.build_op(vtc, name, 64, dim)
        p = vtc.Pipeline([op])
        sig = {k: {l: v.to(device, dtype) for l, v in per.items()}
               for k, per in bo.make_signals(op.requires, args.batch, n, g).items()}
        t = vtc.VisualTokens(x=torch.randn(args.batch, n, dim, generator=g).to(device, dtype), signals=sig,
                             layout=vtc.Layout.grid(side), **bo._space())
        with torch.inference_mode():
            out[name] = {"config": str(p), "dim": dim, "ms": measure(lambda p=p, t=t: p(t, validate=False)),
                         "ms_validated": measure(lambda p=p, t=t: p(t))}
    return out


def divprune_compile(args, device, dtype, measure) -> dict:
    from vtc.ops import divprune

    dim = 64 if args.smoke else 4096
    x = torch.randn(args.batch, 576, dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    t = vtc.VisualTokens(x=x)
    p = vtc.build("divprune:keep=64")
    res = {}
    with torch.inference_mode():
        divprune.set_compile("never")
        res["eager_ms"] = measure(lambda: p(t, validate=False))
        eager = p(t, validate=False).index
        divprune.set_compile("always")
        try:
            t0 = time.perf_counter()
            compiled = p(t, validate=False).index
            res["compile_s"] = time.perf_counter() - t0
            res["compiled_ms"] = measure(lambda: p(t, validate=False))
            res["same_picks"] = bool(torch.equal(eager, compiled))
        except Exception as e:  # noqa: BLE001 - report, do not fail the other figures
            res["error"] = f"{type(e).__name__}: {e}"
        finally:
            divprune.set_compile("auto")
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="a tiny model (checks the script, not the figures)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers built (of 32)")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.smoke:
        args.batch, args.layers = min(args.batch, 2), min(args.layers, 2)
    measure = timer(device)
    res: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                 "torch": torch.__version__, "dtype": str(dtype), "batch": args.batch, "layers_built": args.layers,
                 "layers_full": 32, "smoke": args.smoke}
    import transformers

    res["transformers"] = transformers.__version__
    model, spec, inputs = build(args, device, dtype)
    scale = 32 / args.layers
    with torch.inference_mode():
        t_stock = measure(lambda: model(**inputs, use_cache=False))
        with vtc.apply(model, "divprune:keep=64"):
            t_vtc = measure(lambda: model(**inputs, use_cache=False))
    t_lm576, len576 = lm_time(model, inputs, measure, None)
    t_lm64, len64 = lm_time(model, inputs, measure, 64)
    t_rest = t_stock - t_lm576  # tower, projector, embedding merge
    t_ideal = t_rest + t_lm64
    res["prefill"] = {"stock_ms": t_stock, "vtc_divprune64_ms": t_vtc, "lm_576_ms": t_lm576, "lm_64_ms": t_lm64,
                      "seq_576": len576, "seq_64": len64, "tower_projector_ms": t_rest, "ideal_ms": t_ideal}
    overhead = t_vtc - t_ideal  # the operator, the compaction and vtc.apply's own work
    res["P2_measured"] = t_ideal / t_vtc
    res["P2_scaled_32_layers"] = (t_rest + scale * t_lm64) / (t_rest + scale * t_lm64 + overhead)
    res["speedup_measured"] = {"achieved": t_stock / t_vtc, "ideal": t_stock / t_ideal}
    ops = op_times(args, device, dtype, measure, spec)
    for r in ops.values():
        r["P1_measured"] = r["ms"] / t_lm64
        r["P1_scaled_32_layers"] = r["ms"] / (scale * t_lm64)
    res["operators"] = ops
    if not args.no_compile and not args.smoke:
        res["divprune_compile"] = divprune_compile(args, device, dtype, measure)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "operators"}, indent=1))
    for name, r in ops.items():
        print(f"{name:12s} {r['ms']:8.3f} ms  P1 {100 * r['P1_scaled_32_layers']:.2f}% (32 layers)")


if __name__ == "__main__":
    main()
