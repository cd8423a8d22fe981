"""The shipped Qwen VL configs: they expand, build, and every pipeline attaches to a Qwen VL model."""

from __future__ import annotations

from pathlib import Path

import pytest

import vtc
from vtc.bench.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["qwen2_5_vl_7b", "qwen_smoke"])
def test_qwen_configs_expand_build_and_attach(name):
    from vtc.models.random import random_qwen2_5_vl

    cells = load_config(ROOT / "eval" / "configs" / f"{name}.yaml").cells()
    assert cells and any(c.pipeline() is None for c in cells)
    model, _ = random_qwen2_5_vl(text_layers=28 if name.endswith("7b") else 2)  # in-LLM layers of the 7B's depth
    for cell in cells:
        if cell.pipeline() is not None:
            with vtc.apply(model, cell.pipeline(), **cell.apply_options):
                pass
    sources = {c.model.source for c in cells}
    assert sources == ({"qwen-vl"} if name.endswith("7b") else {"random-qwen2-vl", "random-qwen2-5-vl",
                                                                 "random-qwen3-vl"})


def test_qwen_vl_source_loads_a_local_checkpoint(tmp_path):
    import torch

    from vtc.bench.models import _source, model_entry
    from vtc.errors import ConfigError
    from vtc.models.random import random_qwen2_5_vl

    model, proc = random_qwen2_5_vl()
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    entry = model_entry({"name": "q", "source": "qwen-vl", "path": str(tmp_path / "ckpt"),
                         "options": {"max_pixels": 64 * 64}})
    loaded, lproc = _source("qwen-vl")(entry)
    assert type(loaded) is type(model) and lproc.tokenizer.padding_side == "left"
    assert lproc.image_processor.size["longest_edge"] == 64 * 64
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    with pytest.raises(ConfigError, match="local folder"):
        _source("qwen-vl")(model_entry({"name": "q", "source": "qwen-vl", "path": str(tmp_path / "missing")}))
