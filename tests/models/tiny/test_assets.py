"""The embedded models in assets/: they load offline, fit the size limit, and run under vtc.apply
and vtc bench (the README's main job depends on them)."""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.bench.config import load_config
from vtc.models.tiny.assets import VARIANTS, asset_dir, model_dir
from vtc.models.tiny.datasets import dataset
from vtc.models.tiny.loading import load
from vtc.models.tiny.vocab import prompt


def test_every_variant_is_shipped_within_40_mb():
    for v in VARIANTS:
        assert (model_dir(v) / "config.json").is_file(), f"assets/{v} is missing"
    total = sum(p.stat().st_size for p in asset_dir().rglob("*") if p.is_file())
    assert total <= 40 * 2**20


@pytest.mark.parametrize("variant, data", [("tiny-llava", "shapes"), ("tiny-llava-next", "shapes-large")])
@torch.no_grad()
def test_embedded_model_answers_under_vtc_apply(variant, data):
    m = load(variant)
    item = dataset(data).items("val", limit=1)[0]
    inputs = m.processor(images=[item.image], text=[prompt(item.question)], return_tensors="pt")
    L = inputs["input_ids"].shape[1]
    with vtc.apply(m.model, "random:keep=64") as h:
        out = m.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert h.last.counts[0] < h.last.stock_counts[0]
    words = m.processor.batch_decode(out[:, L:], skip_special_tokens=True)[0].split()
    assert words and "<unk>" not in words  # a word of the closed answer vocabulary


def test_mqt_operator_loads_the_embedded_projector():
    op = vtc.create("mqt", keep=16)
    proj = op.load()
    m = load("tiny-mqt")
    assert proj.dim == m.model.config.vision_config.hidden_size
    assert proj.out_dim == m.model.config.text_config.hidden_size


def test_main_job_config_builds_on_the_shipped_models():
    cfg = load_config("eval/configs/quick.yaml")
    cells = cfg.cells()
    assert {c.model.path for c in cells} == set(VARIANTS)
    ops_used = {op.name for c in cells if c.pipeline() is not None for op in c.pipeline()}
    # the main job shows every operator that can run on it: not the untrained router (an example of a
    # learned in-LLM scorer) nor hiprune (the taps do not record attn_received yet)
    waiting = {"router", "hiprune"}
    assert ops_used == set(vtc.list_ops()) - waiting
