# budget: 120
"""GPU prefill time of in-LLM pruning (FastV, PyramidDrop) through ``vtc.apply`` against stock and the ideal.

On a LLaVA-1.5-7B-shaped model with random weights (CLIP-L/14-336 tower, 24 layers; a Vicuna-7B-wide
Llama decoder: hidden 4096, FFN 11008, 32 heads, built with ``--layers`` of its 32 decoder layers so
the run fits its budget; bfloat16, SDPA; a small vocabulary), one 336px image and a ~60-word prompt
per sample, at batch 1 and 8, the prefill (``model(**inputs, use_cache=True)``, the first step of
``generate``) is timed for:

- stock (576 visual tokens in every layer);
- ``fastv:K=2,R=0.5`` and ``fastv:K=2,R=0.75`` (tokens dropped after layer 1);
- ``pdrop`` (its ``[8, 16, 24]`` of 32 scaled to the built depth, 50/25/12.5% kept).

**The ideal** is the same prefill fed those token counts directly: the tower, projector and
embedding time of stock plus, for each decoder layer, the time of one decoder layer at the number of
tokens it processed (measured by running the language model alone on sequences of each count, divided
by its depth). ``efficiency = T_ideal / T_vtc`` (1.0: the integration costs nothing beyond the
smaller layers); ``speedup = T_stock / T_vtc`` next to ``ideal_speedup = T_stock / T_ideal``.

Scaling to the real 32 layers: a decoder layer's time depends only on its token count, so the
32-layer figures are rebuilt from the per-layer times measured here with each method's schedule at
32 layers (FastV drops after layer 1 of 32, PDrop after 8/16/24) and vtc's measured overhead
(``T_vtc - T_ideal`` at the built depth: the q/k row recomputation, the gathers, the per-layer masks;
it grows with the number of drops, which is the same at both depths); they are reported as
``*_32_layers``.

Run on a GPU: ``PYTHONPATH=. python eval/gpu/llm_layer.py --out llm_layer.json`` (from ``eval/gpu_check.sh``).
Check it on a CPU: ``python eval/gpu/llm_layer.py --device cpu --smoke --out /tmp/llm_layer.json`` (tiny model).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ops import build, timer  # noqa: E402  (eval/gpu/ops.py: the same 7B-shaped model and prompt)

import vtc  # noqa: E402
from vtc.bench.flops import layer_visual_counts  # noqa: E402

METHODS = ("fastv:K=2,R=0.5", "fastv:K=2,R=0.75", "pdrop")
FULL_DEPTH = 32


def first(inputs: dict, batch: int) -> dict:
    """The first ``batch`` samples of a batch of identical prompts and images."""
    return {k: v[:batch] for k, v in inputs.items()}


def layer_times(model, batch: int, lengths: set[int], measure, device, dtype) -> dict[int, float]:
    """Time of ONE decoder layer at each sequence length (the language model alone, divided by its depth)."""
    lm = model.model.language_model
    depth = len(lm.layers)
    out = {}
    for n in sorted(lengths):
        emb = torch.randn(batch, n, lm.config.hidden_size, device=device, dtype=dtype)
        mask = torch.ones(batch, n, dtype=torch.long, device=device)
        out[n] = measure(lambda emb=emb, mask=mask: lm(inputs_embeds=emb, attention_mask=mask, use_cache=True)) / depth
    return out


def run_batch(model, inputs: dict, batch: int, measure, device, dtype) -> dict:
    inputs = first(inputs, batch)
    ids = inputs["input_ids"]
    visual = int((ids[0] == model.config.image_token_id).sum())
    text = ids.shape[1] - visual
    depth = len(model.model.language_model.layers)
    res: dict = {"batch": batch, "visual": visual, "text": text}
    with torch.inference_mode():
        t_stock = measure(lambda: model(**inputs, use_cache=True))
        runs = {}
        for spec_str in METHODS:
            pipe = vtc.build(spec_str)
            with vtc.apply(model, pipe) as h:
                t = measure(lambda: model(**inputs, use_cache=True))
                counts = h.last.extra["layer_visual"][0]
            assert counts == layer_visual_counts(pipe, visual, depth), (spec_str, counts)
            runs[spec_str] = (t, counts, pipe)
        lengths = {text + visual} | {text + c for _, counts, _ in runs.values() for c in counts}
        full = {text + c for _, _, p in runs.values() for c in layer_visual_counts(p, visual, FULL_DEPTH)}
        per_layer = layer_times(model, batch, lengths | full, measure, device, dtype)
    t_rest = t_stock - depth * per_layer[text + visual]  # tower, projector, embeddings, merge
    res["stock_ms"] = t_stock
    res["tower_projector_ms"] = t_rest
    res["layer_ms"] = {str(n): v for n, v in per_layer.items()}
    stock32 = t_rest + FULL_DEPTH * per_layer[text + visual]
    res["stock_ms_32_layers"] = stock32
    for spec_str, (t, counts, pipe) in runs.items():
        ideal = t_rest + sum(per_layer[text + c] for c in counts)
        overhead = t - ideal
        counts32 = layer_visual_counts(pipe, visual, FULL_DEPTH)
        ideal32 = t_rest + sum(per_layer[text + c] for c in counts32)
        res[spec_str] = {
            "layer_visual": counts, "equivalent_tokens": sum(counts) / len(counts), "vtc_ms": t, "ideal_ms": ideal,
            "speedup": t_stock / t, "ideal_speedup": t_stock / ideal, "efficiency": ideal / t,
            "overhead_ms": overhead,
            "equivalent_tokens_32_layers": sum(counts32) / len(counts32),
            "speedup_32_layers": stock32 / (ideal32 + overhead), "ideal_speedup_32_layers": stock32 / ideal32,
            "efficiency_32_layers": ideal32 / (ideal32 + overhead),
        }
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="a tiny model (checks the script, not the figures)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--layers", type=int, default=16, help="decoder layers built (of 32)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    if args.smoke:
        args.layers, batches = min(args.layers, 4), [min(b, 2) for b in batches]
    import transformers

    args.batch = max(batches)
    model, _, inputs = build(args, device, dtype)
    res: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                 "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype),
                 "attention": model.config.text_config._attn_implementation, "layers_built": args.layers,
                 "layers_full": FULL_DEPTH, "smoke": args.smoke, "methods": list(METHODS), "results": []}
    measure = timer(device)
    for b in batches:
        res["results"].append(run_batch(model, inputs, b, measure, device, dtype))
        Path(args.out).write_text(json.dumps(res, indent=1))  # what finished survives a timeout
    for r in res["results"]:
        print(f"batch {r['batch']}: stock {r['stock_ms']:.1f} ms ({r['visual']} visual + {r['text']} text tokens)")
        for m in METHODS:
            x = r[m]
            print(f"  {m:18s} {x['vtc_ms']:8.1f} ms  speedup {x['speedup']:.2f}x (ideal {x['ideal_speedup']:.2f}x, "
                  f"efficiency {100 * x['efficiency']:.0f}%); 32 layers: {x['speedup_32_layers']:.2f}x "
                  f"(ideal {x['ideal_speedup_32_layers']:.2f}x)")


if __name__ == "__main__":
    main()
