"""vtc bench on a Qwen VL model: the random-qwen2-5-vl source, chat 'auto', tokens and FLOPs per question."""

from __future__ import annotations

from conftest import tiny_config

from vtc.bench.config import load_config
from vtc.bench.flops import ModelShape, vision_flops
from vtc.bench.rows import read_rows
from vtc.bench.runner import run


def test_bench_runs_pool_on_qwen2_5_vl(tmp_path, jsonl_task):
    out = tmp_path / "run"
    model = {"name": "qwen", "source": "random-qwen2-5-vl", "device": "cpu", "chat": "auto"}
    cfg = tiny_config(jsonl_task, out, models=[model], pipelines=["pool:keep={budget}"], budgets=[4])
    run(load_config(cfg), progress=False)
    rows = {p.name.split("__")[2]: read_rows(p) for p in (out / "rows").glob("*.jsonl")}
    base, pooled = rows["baseline"], rows["pool-4"]
    from vtc.models.random import random_qwen2_5_vl

    shape = ModelShape.from_config(random_qwen2_5_vl()[0].config)
    good = [(b, p) for b, p in zip(base, pooled) if not b["error"]]
    assert len(good) == 6
    # images of (40 + 8i) x 32 px: 8 x (10 + 2i) patches, (20 + 4i) merged tokens
    assert [b["visual_tokens"] for b, _ in good] == [20 + 4 * i for i in range(6)]
    for b, p in good:
        assert b["kept_tokens"] == b["visual_tokens"] and p["kept_tokens"] == 4 and p["applied"]
        assert p["passes"] == b["passes"] == 1
        assert p["flops"]["vision"] == b["flops"]["vision"] > 0
        assert p["flops"]["prefill"] < b["flops"]["prefill"]
    # the tower's FLOPs follow each image's own grid
    assert good[0][0]["flops"]["vision"] == vision_flops(shape.vision, grids=[(8, 10)])
    assert good[-1][0]["flops"]["vision"] > good[0][0]["flops"]["vision"]
