"""Loading a trained embedded model: the HF model, its processor and (``tiny-mqt``) the MQT projector.

``load("tiny-llava")`` reads ``assets/tiny-llava`` (or any exported folder) with the stock
``from_pretrained`` of ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``
and ``LlavaProcessor`` / ``LlavaNextProcessor``, offline, in fp32 (the weights may be stored in
fp16). For ``tiny-mqt``, run the model with ``vtc.build("mqt:keep=m")`` (weights from the same
folder) in place of its projector: the folder's MLP projector is ``tiny-llava``'s, kept so the
folder loads as a stock LLaVA.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vtc.errors import ConfigError
from vtc.models.tiny.assets import VARIANTS, model_dir

__all__ = ["TinyModel", "load"]


@dataclass
class TinyModel:
    """A loaded embedded model: ``model``, ``processor``, ``mqt`` (projector or None), ``path``, ``family``."""

    model: Any
    processor: Any
    mqt: Any
    path: Path
    family: str


def load(name_or_path: str, dtype: torch.dtype = torch.float32) -> TinyModel:
    """Load an embedded model by variant name (from the assets folder) or from an exported folder."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = model_dir(name_or_path) if name_or_path in VARIANTS else Path(name_or_path)
    if not (path / "config.json").is_file():
        hint = (f"train it: python -m vtc.models.tiny train --variant {name_or_path} ..."
                if name_or_path in VARIANTS else "pass a folder written by the tiny trainer's export")
        raise ConfigError(f"no embedded model at {path} (no config.json); {hint}")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type == "llava":
        from transformers import LlavaForConditionalGeneration as M
        from transformers import LlavaProcessor as P
        family = "llava"
    elif model_type == "llava_next":
        from transformers import LlavaNextForConditionalGeneration as M
        from transformers import LlavaNextProcessor as P
        family = "llava-next"
    else:
        raise ConfigError(f"{path}: model_type {model_type!r} is not an embedded LLaVA / LLaVA-NeXT model")
    model = M.from_pretrained(path, dtype=dtype, use_safetensors=True).eval()  # never a pickled checkpoint
    processor = P.from_pretrained(path)
    mqt = None
    from vtc.ops.mqt import WEIGHTS_FILE, MQTProjector

    if (path / WEIGHTS_FILE).is_file():
        mqt = MQTProjector.from_file(path / WEIGHTS_FILE).to(dtype).eval()
    return TinyModel(model, processor, mqt, path, family)
