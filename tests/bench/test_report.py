"""vtc.bench.report / plots: summaries, agreement, Markdown/CSV and PNGs rebuilt from rows alone."""

from __future__ import annotations

import csv
import json
import math

import pytest

from vtc.bench.report import build_report, summarize_cell
from vtc.bench.rows import write_rows
from vtc.cli import main
from vtc.errors import ConfigError


def _row(qid, pred, answer, kept, total, error=None):
    return {"qid": qid, "prediction": None if error else pred, "answers": [answer],
            "score": None if error else float(pred == answer), "error": error, "kept_tokens": kept,
            "visual_tokens": 576, "text_tokens": 20, "new_tokens": 1, "time_s": 0.5, "applied": True,
            "flops": {"total": total, "prefill": total / 2, "vision": 1e11, "projector": 1e10, "ops": 0, "decode": 1e9,
                      "fastv_compat": total / 4, "kv_cache_bytes": 2**20}}


def _make_run(tmp_path):
    run = tmp_path / "run"
    (run / "cells").mkdir(parents=True)
    (run / "rows").mkdir()
    cells = {
        "m__t__baseline__h0": ("baseline", None, [("q1", "red", "red"), ("q2", "blue", "blue"), ("q3", "red", "green"),
                                                 ("q4", "x", "x")], 576, 4e12),
        "m__t__divprune-64__h1": ("divprune", 64, [("q1", "red", "red"), ("q2", "red", "blue"), ("q3", "red", "green"),
                                                  ("q4", "x", "x")], 64, 1e12),
        "m__t__divprune-128__h2": ("divprune", 128, [("q1", "red", "red"), ("q2", "blue", "blue"),
                                                    ("q3", "green", "green"), ("q4", "x", "x")], 128, 2e12),
    }
    for cid, (method, budget, qa, kept, total) in cells.items():
        rows = [_row(q, p, a, kept, total) for q, p, a in qa]
        rows[3] = _row("q4", "x", "x", kept, total, error="unreadable image: boom")
        write_rows(run / "rows" / f"{cid}.jsonl", rows)
        meta = {"id": cid, "hash": cid[-2:], "model": "m", "task": "t", "method": method, "budget": budget,
                "metric": "exact", "env": {"device": "cpu"},
                "latency": {"ttft_ms": {"median": 12.5, "p90": 14.0}, "tpot_ms": {"median": 3.0}, "peak_mem_bytes": 2**30}}
        (run / "cells" / f"{cid}.json").write_text(json.dumps(meta))
    (run / "run.json").write_text(json.dumps({"name": "demo", "cells": list(cells)}))
    return run


def test_summaries_by_hand(tmp_path):
    run = _make_run(tmp_path)
    summaries = {s["id"]: s for s in build_report(run)}
    base, d64, d128 = (summaries[k] for k in ("m__t__baseline__h0", "m__t__divprune-64__h1", "m__t__divprune-128__h2"))
    # 3 answered questions each (q4 is an error row); exact-match scores 2/3, 1/3, 3/3
    assert base["score"] == pytest.approx(200 / 3) and d64["score"] == pytest.approx(100 / 3) and d128["score"] == 100
    assert base["answered"] == 3 and base["errors"] == 1
    # agreement with the baseline's answers: d64 agrees on q1, q3 (2/3); d128 on q1, q2 (2/3)
    assert base["agreement"] == 100 and d64["agreement"] == pytest.approx(200 / 3) and d128["agreement_n"] == 3
    assert d64["kept_tokens"] == 64 and d64["tflops"] == pytest.approx(1.0) and d64["fastv_tflops"] == pytest.approx(0.25)
    assert d64["ttft_ms"] == 12.5 and d64["peak_mem_mib"] == 1024 and d64["kv_cache_mib"] == 1


def test_report_files_rebuild_identically(tmp_path):
    run = _make_run(tmp_path)
    build_report(run)
    md = (run / "report.md").read_text()
    assert "### m / t (exact)" in md and "| divprune | 64 | 64.0 | 33.33 | 66.7 | 1 |" in md
    with (run / "report.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["method"] for r in table] == ["baseline", "divprune", "divprune"]
    assert float(table[2]["score"]) == 100.0
    for name in ("m__t__tokens.png", "m__t__tflops.png"):
        data = (run / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    first = {p: (run / p).read_text() for p in ("report.md", "report.csv", "summary.jsonl")}
    for p in first:
        (run / p).unlink()
    assert main(["report", str(run)]) == 0  # the CLI rebuilds the same files from the rows
    assert {p: (run / p).read_text() for p in first} == first


def test_summary_without_rows_and_bad_folder(tmp_path):
    s = summarize_cell({"id": "x", "model": "m", "task": "t", "method": "pool", "metric": "vqa"}, [], None)
    assert s["answered"] == 0 and math.isnan(s["score"]) and math.isnan(s["agreement"])
    with pytest.raises(ConfigError, match="not a vtc bench run folder"):
        build_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2


def test_scores_by_question_type():
    meta = {"id": "c", "model": "m", "task": "t", "method": "uniform", "budget": 64, "metric": "exact"}
    rows = [dict(_row(f"q{i}", p, a, 64, 1e12), qtype=t) for i, (p, a, t) in enumerate(
        [("two", "two", "count"), ("one", "three", "count"), ("yes", "yes", "exist"), ("no", "yes", "exist"),
         ("red", "red", "attribute")])]
    s = summarize_cell(meta, rows, None)
    assert s["qtypes"] == ["attribute", "count", "exist"]
    assert (s["score[count]"], s["score[exist]"], s["score[attribute]"]) == (50.0, 50.0, 100.0)
    assert s["score"] == 60.0
    from vtc.bench.report import markdown_table

    table = markdown_table([s])
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert "| score | attribute | count | exist |" in header
    assert "| 60.00 | 100.00 | 50.00 | 50.00 |" in table
    one_type = summarize_cell(meta, [dict(r, qtype="count") for r in rows], None)
    assert "qtypes" not in one_type  # a single type adds nothing to the overall score
