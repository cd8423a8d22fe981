"""Training checkpoints (resumable, bit-exact) and the exported Hugging Face folders.

A checkpoint is two files in the run folder, written atomically: ``checkpoint.safetensors`` (the
model, MQT and aux-head parameters and AdamW's moments, fp32) and ``checkpoint.json`` (step,
variant, recipe, optimizer hyper-parameters, elapsed time, loss history). Every batch and every
random choice of a step is a function of ``(seed, step)``, so resuming continues exactly the run
that a single uninterrupted process would have made.

An export is what goes to ``assets/<variant>/``: ``save_pretrained`` of the model (fp32 by default,
fp16 on request) and of its processor, ``mqt.safetensors`` for ``tiny-mqt``, and ``train_info.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "export_folder", "CKPT_TENSORS", "CKPT_JSON"]

CKPT_TENSORS = "checkpoint.safetensors"
CKPT_JSON = "checkpoint.json"


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"opt.{idx}.{k}"] = t.detach().contiguous().cpu()
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(run_dir: str | os.PathLike, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
                    info: dict[str, Any]) -> None:
    """Write the run's state (``modules``: name -> module, e.g. model / mqt / aux) atomically."""
    from safetensors.torch import save_file

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in modules.items():
        for k, v in mod.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().contiguous().cpu()
    opt_t, opt_meta = _flat_optimizer(opt)
    tensors.update(opt_t)
    # tied weights share storage; safetensors wants distinct tensors
    seen: dict[int, str] = {}
    for k in list(tensors):
        ptr = tensors[k].data_ptr()
        if ptr in seen and tensors[k].numel():
            tensors[k] = tensors[k].clone()
        seen[ptr] = k
    tmp = run / (CKPT_TENSORS + ".tmp")
    save_file(tensors, str(tmp))
    meta = {**info, "optimizer": opt_meta}
    tmpj = run / (CKPT_JSON + ".tmp")
    tmpj.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, run / CKPT_TENSORS)
    os.replace(tmpj, run / CKPT_JSON)


def load_checkpoint(run_dir: str | os.PathLike, modules: dict[str, torch.nn.Module],
                    opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore ``modules`` and ``opt`` from a run folder; returns the saved info (``step`` etc.)."""
    from safetensors.torch import load_file

    run = Path(run_dir)
    tensors = load_file(str(run / CKPT_TENSORS))
    info = json.loads((run / CKPT_JSON).read_text())
    for name, mod in modules.items():
        pre = f"{name}."
        sd = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        mod.load_state_dict(sd, strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": info["optimizer"]["param_groups"]})
    return info


def export_folder(dest: str | os.PathLike, model, processor, mqt=None, info: dict[str, Any] | None = None,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Write a loadable HF folder (model, processor, optional ``mqt.safetensors``, ``train_info.json``)."""
    from vtc.ops.mqt import WEIGHTS_FILE

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    orig = next(model.parameters()).dtype
    model.to(dtype)
    try:
        model.save_pretrained(dest)
    finally:
        model.to(orig)
    processor.save_pretrained(dest)
    if mqt is not None:
        mqt.save(dest / WEIGHTS_FILE, extra={"variant": str((info or {}).get("variant", ""))})
    if info is not None:
        (dest / "train_info.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    return dest
