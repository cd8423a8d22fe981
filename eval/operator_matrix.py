"""Which operators run on which model family: each through ``vtc.apply`` + ``generate()`` on the tiny random models.

For every family vtc has an adapter for (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL,
Qwen3-VL) and every registered operator at a small budget, it runs one greedy ``generate`` of two
tokens on one 112x84 image and prints a markdown table: ``ok`` or the ``vtc.errors`` class raised
(``-v`` prints the messages, which say what to use instead). ``mqt`` is left out: it needs its
trained projector (the embedded tiny-mqt), not a random model's. Offline, CPU, about 10 seconds.

    python eval/operator_matrix.py [-v]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from PIL import Image

import vtc
from vtc.models import random as tiny_random

FAMILIES = {
    "LLaVA": tiny_random.random_llava, "LLaVA-NeXT": tiny_random.random_llava_next,
    "OneVision": tiny_random.random_llava_onevision, "Qwen2-VL": tiny_random.random_qwen2_vl,
    "Qwen2.5-VL": tiny_random.random_qwen2_5_vl, "Qwen3-VL": tiny_random.random_qwen3_vl,
}
#: one spec per operator; the random models' decoders have 2 layers, so the in-LLM schedules name theirs
SPECS = {
    "random": "random:keep=16", "uniform": "uniform:keep=16", "pool": "pool:keep=16", "m3": "m3:keep=16",
    "divprune": "divprune:keep=16", "tome": "tome:keep=16", "vtc-cls": "vtc-cls:keep=16", "hired": "hired:keep=16",
    "globalcom2": "globalcom2", "aim_merge": "aim_merge:keep=16", "visionzip": "visionzip:keep=16",
    "visionzip (attn_received)": "visionzip:keep=16,signal=attn_received", "hiprune": "hiprune:keep=16",
    "fastv": "fastv", "pdrop": "pdrop:layers=[0,1],ratios=[0.5,0.25]",
    "aim": "aim:start=0,step=0.5", "sparsevlm": "sparsevlm:layers=[0,1],counts=[12,6]",
}


def prompt(processor) -> str:
    try:
        return processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}],
            add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - the LLaVA random processors carry no chat template
        return "user : <image> what is this ? assistant :"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="print each error's message")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    table: dict[str, dict[str, str]] = {op: {} for op in SPECS}
    messages = []
    for fam, make in FAMILIES.items():
        model, processor = make()
        inputs = processor(images=[Image.new("RGB", (112, 84), (120, 30, 60))], text=[prompt(processor)],
                           return_tensors="pt")
        for op, spec in SPECS.items():
            try:
                with vtc.apply(model, spec), torch.no_grad():
                    model.generate(**inputs, max_new_tokens=2, do_sample=False)
                table[op][fam] = "ok"
            except vtc.errors.VtcError as e:
                table[op][fam] = type(e).__name__
                messages.append(f"{fam} {spec}: {e}")
    print("| operator | " + " | ".join(FAMILIES) + " |")
    print("|---" * (len(FAMILIES) + 1) + "|")
    for op, row in table.items():
        print(f"| {op} | " + " | ".join(row[f] for f in FAMILIES) + " |")
    if args.verbose:
        print("\n" + "\n".join(messages))


if __name__ == "__main__":
    main()
