"""vtc.bench.runner end to end on the tiny random LLaVA: rows, error rows, resume, the apply seam, CLI."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config

from vtc.bench.attach import PromptCounter, language_model
from vtc.bench.config import load_config
from vtc.bench.loaders import Question, register_loader
from vtc.bench.rows import read_rows
from vtc.bench.runner import run
from vtc.cli import main

ORDER = ["q0", "q1", "q_broken", "q2", "line5", "q3", "q4", "q5", "q_noanswer"]
HAS_INTEGRATION = importlib.util.find_spec("vtc.integrations") is not None


def _rows(out: Path, method: str) -> list[dict]:
    files = [p for p in (out / "rows").glob("*.jsonl") if f"__{method}" in p.name]
    assert len(files) == 1, files
    return read_rows(files[0])


def test_end_to_end_through_the_cli(tmp_path, jsonl_task, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(jsonl_task, out, latency={"warmup": 0, "repeats": 1, "new_tokens": 2, "batch": 1})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["bench", str(tmp_path / "cfg.yaml"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| baseline |" in printed and "| divprune | 64 |" in printed

    base, pruned = _rows(out, "baseline"), _rows(out, "divprune-64")
    for rows in (base, pruned):
        assert [r["qid"] for r in rows] == ORDER  # one row per question, in question order
        errors = {r["qid"]: r["error"] for r in rows if r["error"]}
        assert set(errors) == {"q_broken", "line5", "q_noanswer"}
        assert errors["q_broken"].startswith("unreadable image") and errors["line5"].startswith("malformed question")
        for r in rows:
            if r["error"]:
                assert r["prediction"] is None and r["score"] is None
                continue
            assert isinstance(r["prediction"], str) and 0.0 <= r["score"] <= 1.0
            assert r["visual_tokens"] == 576 and r["text_tokens"] > 5 and 1 <= r["new_tokens"] <= 2
            assert r["flops"]["total"] > r["flops"]["prefill"] > 0 and r["time_s"] > 0
            assert r["env"]["device"].startswith("cpu") and r["env"]["dtype"] == "float32" and "torch" in r["env"]
            assert r["hash"] in r["cell"]
    assert all(r["kept_tokens"] == 576 for r in base if not r["error"])
    assert all(r["applied"] is HAS_INTEGRATION for r in pruned)
    if HAS_INTEGRATION:
        assert all(r["kept_tokens"] == 64 for r in pruned if not r["error"])
        assert all(p["flops"]["prefill"] < b["flops"]["prefill"] for p, b in zip(pruned, base) if not p["error"])
    else:  # ran uncompressed: same answers, same tokens, marked applied=false
        assert [r["prediction"] for r in pruned] == [r["prediction"] for r in base]
        assert all(r["kept_tokens"] == 576 for r in pruned if not r["error"])

    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    assert {c["method"] for c in cells} == {"baseline", "divprune"}
    for c in cells:
        s = c["summary"]
        assert s["answered"] == 6 and s["errors"] == 3
        assert c["latency"]["ttft_ms"]["median"] > 0 and c["latency"]["vision_ms"]["n"] == 1
        assert c["latency"]["peak_mem_bytes"] > 0
    for name in ("report.md", "report.csv", "summary.jsonl", "plots/tiny__colors__tokens.png",
                 "plots/tiny__colors__tflops.png"):
        assert (out / name).is_file(), name

    # a rerun with --keep-errors finds every row on disk and answers nothing
    calls = []
    run(load_config(tmp_path / "cfg.yaml"), on_batch=lambda *a: calls.append(a), progress=False, keep_errors=True)
    assert calls == []
    assert _rows(out, "baseline") == base


def test_resume_after_interrupt(tmp_path, jsonl_task):
    out = tmp_path / "run"
    cfg = load_config(tiny_config(jsonl_task, out, batch_size=2, pipelines=[]))

    def stop_after_two(cell, batch_index, rows):
        if batch_index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, on_batch=stop_after_two, progress=False)
    first = _rows(out, "baseline")
    assert [r["qid"] for r in first] == ORDER[:4]  # two batches of two reached the disk
    # a crash in the middle of writing leaves half a line: it is dropped on resume
    path = next((out / "rows").glob("*.jsonl"))
    with path.open("a") as fh:
        fh.write('{"qid": "q3", "predic')

    answered = []
    run(cfg, on_batch=lambda cell, i, rows: answered.extend(r["qid"] for r in rows), progress=False)
    assert answered == ["q_broken", *ORDER[4:]]  # only what was missing, and the error row asked again
    final = _rows(out, "baseline")
    assert [r["qid"] for r in final] == ORDER  # complete, no duplicates, in order
    assert final[:4] == first
    assert path.read_text().endswith("\n")


def test_apply_seam_uses_the_handle(tmp_path, jsonl_task, monkeypatch):
    """With vtc.integrations present, rows are applied, kept tokens come from the Handle, FLOPs follow."""
    events = []

    class Handle:
        def __init__(self, model, pipeline):
            self.keep, self.batch = pipeline[0].config.keep, 0
            self.hook = language_model(model).register_forward_pre_hook(self._seen, with_kwargs=True)

        def _seen(self, mod, args, kwargs):
            self.batch = kwargs["inputs_embeds"].shape[0]

        def kept_tokens(self):
            return [self.keep] * self.batch

        def remove(self):
            self.hook.remove()
            events.append("removed")

    fake = types.ModuleType("vtc.integrations")
    fake.apply = lambda model, pipeline, **options: events.append(("applied", options)) or Handle(model, pipeline)
    monkeypatch.setitem(sys.modules, "vtc.integrations", fake)
    out = tmp_path / "run"
    pipes = [{"name": "divprune", "pipeline": "divprune:keep={budget}", "apply": {"position_ids": "original"}}]
    run(load_config(tiny_config(jsonl_task, out, budgets=[64, 128], pipelines=pipes)), progress=False)
    # every pipeline is attached once up front (fail fast), then once per cell; always removed
    applied = ("applied", {"position_ids": "original"})
    assert events == [applied, "removed"] * 4
    base = {r["qid"]: r for r in _rows(out, "baseline") if not r["error"]}
    for keep in (64, 128):
        rows = [r for r in _rows(out, f"divprune-{keep}") if not r["error"]]
        assert rows and all(r["applied"] and r["kept_tokens"] == keep for r in rows)
        for r in rows:
            b = base[r["qid"]]["flops"]
            assert r["flops"]["ops"] > 0 and r["flops"]["prefill"] < b["prefill"] and r["flops"]["vision"] == b["vision"]


def test_kept_tokens_from_the_handle_report():
    from vtc.bench.attach import Attachment

    handle = types.SimpleNamespace(last=types.SimpleNamespace(counts=[64, 70]))
    assert Attachment(pipeline=None, handle=handle, applied=True).kept_tokens() == [64, 70]
    assert Attachment(pipeline=None, handle=types.SimpleNamespace(last=None), applied=True).kept_tokens() is None


def test_a_question_failing_alone_becomes_an_error_row(tmp_path):
    from PIL import Image

    @register_loader("_test_sizes")
    def sizes(split, base_dir=None):
        for i, side in enumerate([32, 0, 48, 40]):  # a 0x0 image breaks the processor
            yield Question(qid=f"s{i}", image=Image.new("RGB", (side, side), (0, 0, 255)), question="what color?",
                           answers=["blue"])

    task = {"task": {"name": "sizes", "loader": "_test_sizes", "metric": "exact", "max_new_tokens": 1}}
    out = tmp_path / "run"
    cfg = tiny_config("unused", out, tasks=[task], pipelines=[], batch_size=4)
    run(load_config(cfg), progress=False)
    rows = _rows(out, "baseline")
    assert [r["qid"] for r in rows] == ["s0", "s1", "s2", "s3"]
    assert [bool(r["error"]) for r in rows] == [False, True, False, False]
    assert rows[1]["error"].startswith("generation failed")


def test_prompt_counter_counts_at_the_language_model_input():
    import torch
    from PIL import Image

    from vtc.bench.models import load_model, model_entry

    model, proc = load_model(model_entry({"name": "tiny", "source": "random-llava", "device": "cpu"}))
    prompts = ["USER: <image>\nwhat ASSISTANT:", "USER: <image>\nwhat is the color of the shape ASSISTANT:"]
    inputs = proc(images=[Image.new("RGB", (32, 32))] * 2, text=prompts, return_tensors="pt", padding=True)
    with PromptCounter(model) as counter, torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    text = ((inputs["input_ids"] != model.config.image_token_id) & inputs["attention_mask"].bool()).sum(1)
    assert counter.lengths == inputs["attention_mask"].sum(1).tolist()  # the prefill call, not the decode steps
    assert [n - t for n, t in zip(counter.lengths, text.tolist())] == [576, 576]


def test_every_file_of_a_run_is_written_atomically_and_a_damaged_cell_is_rebuilt(tmp_path, jsonl_task, monkeypatch,
                                                                                  capsys):
    import os

    replaced = set()
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.add(Path(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(jsonl_task, out, limit=4, budgets=[32])))
    assert main(["bench", str(cfg), "--no-progress"]) == 0
    written = {p for p in out.rglob("*") if p.is_file()}
    assert {p.name for p in written} >= {"config.yaml", "run.json", "summary.jsonl", "report.md", "report.csv"}
    assert written == replaced  # every file: a temporary renamed over the target, none written in place
    # a cell file cut short (a disk filling up): `vtc report` names it and the fix, `vtc bench` rebuilds it
    cell = next((out / "cells").glob("*__divprune-32__*.json"))
    good = json.loads(cell.read_text())
    cell.write_text(cell.read_text()[:50])
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(cell) in err and "damaged: truncated" in err and "rerun `vtc bench`" in err
    assert main(["bench", str(cfg), "--no-progress", "--keep-errors"]) == 0
    assert "rebuilding it from the rows" in capsys.readouterr().err
    rebuilt = json.loads(cell.read_text())
    # the cell's peak memory was measured while it answered; a rebuild that answers nothing cannot know it
    mem = ("peak_mem_mib", "peak_mem_kind", "mem_base_mib")
    assert rebuilt["memory"] is None and good["memory"]["kind"].startswith("cpu_rss_growth")
    assert {k: v for k, v in rebuilt["summary"].items() if k not in mem} == {k: v for k, v in good["summary"].items() if k not in mem}
    assert rebuilt["spec"] == good["spec"]
    assert main(["report", str(out)]) == 0


def test_error_rows_are_asked_again_on_resume_unless_keep_errors(tmp_path, jsonl_task):
    from PIL import Image

    out = tmp_path / "run"
    cfg = load_config(tiny_config(jsonl_task, out, pipelines=[], limit=4))
    run(cfg, progress=False)
    assert _rows(out, "baseline")[2]["error"].startswith("unreadable image")  # q_broken
    Image.new("RGB", (40, 32), (30, 30, 220)).save(jsonl_task.parent / "img" / "broken.png")  # the image is restored
    asked = []
    run(cfg, progress=False, keep_errors=True, on_batch=lambda c, i, rows: asked.extend(r["qid"] for r in rows))
    assert asked == [] and _rows(out, "baseline")[2]["error"]
    run(cfg, progress=False, on_batch=lambda c, i, rows: asked.extend(r["qid"] for r in rows))
    assert asked == ["q_broken"]
    rows = _rows(out, "baseline")
    assert [r["qid"] for r in rows] == ["q0", "q1", "q_broken", "q2"]  # one row each, question order
    assert rows[2]["error"] is None and isinstance(rows[2]["prediction"], str)
    (cell,) = (out / "cells").iterdir()
    assert json.loads(cell.read_text())["summary"]["errors"] == 0


def test_a_pipeline_that_cannot_run_fails_the_pre_flight_before_any_cell(tmp_path, jsonl_task, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(jsonl_task, tmp_path / "run", budgets=[64],
                                              pipelines=["divprune:keep={budget}", "m3:keep=25"])))
    assert main(["bench", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pre-flight failed: pipeline 'm3:keep=25' on tiny / colors / m3" in err and "24x24" in err
    assert "No cell has run" in err
    assert not (tmp_path / "run" / "rows").exists()  # not even the baseline


@pytest.mark.parametrize("flags, config, match", [
    (["--batch-size", "0"], {}, "--batch-size must be a whole number >= 1, got 0"),
    (["--batch-size", "-1"], {}, "--batch-size must be"),
    ([], {"batch_size": -2}, "batch_size must be a whole number >= 1, got -2"),
    ([], {"batch_size": 0}, "batch_size must be"),
    ([], {"limit": "abc"}, "limit must be a whole number >= 1 or null, got 'abc'"),
    (["--limit", "0"], {}, "--limit must be"),
    ([], {"seed": -1}, "seed must be"),
    (["--threads", "0"], {}, "--threads must be >= 1"),
])
def test_bad_batch_size_and_limit_fail_before_a_model_loads(tmp_path, jsonl_task, monkeypatch, capsys, flags, config,
                                                            match):
    import vtc.bench.runner as runner

    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(jsonl_task, tmp_path / "run", **config)))
    assert main(["bench", str(cfg), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vtc bench: error: ") and match in err and "Traceback" not in err


def test_in_llm_pruning_is_counted_per_layer_as_measured(tmp_path, jsonl_task):
    """fastv inside the 2-layer decoder of the tiny random LLaVA: every row's FLOPs count layer 0 at
    576 visual tokens and layer 1 at the 144 the integration measured, and the report shows the
    layer-average "equivalent tokens" next to the 576 tokens at the LLM input."""
    from vtc.bench.attach import Attachment

    out = tmp_path / "run"
    pipes = [{"name": "fastv", "pipeline": "fastv:K=1,R=0.75", "budgets": None}]
    run(load_config(tiny_config(jsonl_task, out, pipelines=pipes)), progress=False)
    base = {r["qid"]: r for r in _rows(out, "baseline") if not r["error"]}
    rows = [r for r in _rows(out, "fastv") if not r["error"]]
    assert rows
    for r in rows:
        f = r["flops"]
        assert r["kept_tokens"] == 576 and f["layer_visual"] == [576, 144] and f["equivalent_tokens"] == 360
        assert f["prefill"] < base[r["qid"]]["flops"]["prefill"] and f["fastv_compat"] < base[r["qid"]]["flops"]["fastv_compat"]
    report = (out / "report.md").read_text()
    assert "equiv. tokens" in report and "| 360.0 |" in report
    handle = types.SimpleNamespace(last=types.SimpleNamespace(counts=[9], extra={"layer_visual": [[9, 3]]}))
    assert Attachment(pipeline=None, handle=handle, applied=True).layer_visual() == [[9, 3]]
    assert Attachment(pipeline=None, handle=types.SimpleNamespace(last=None), applied=True).layer_visual() is None
