"""vtc.bench.report / plots: summaries, intervals, paired tests, agreement, Markdown/CSV and PNGs rebuilt from rows."""

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
                "latency": {"ttft_ms": {"median": 12.5, "p90": 14.0}, "tpot_ms": {"median": 3.0}, "peak_mem_bytes": 2**31},
                "memory": {"peak_bytes": 2**30, "base_bytes": 2**29, "kind": "cpu_rss_growth"}}
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
    assert d64["peak_mem_kind"] == "cpu_rss_growth" and d64["profile_peak_mem_mib"] == 2048
    # every cell carries its interval; compressed cells a paired test against the baseline
    assert all(s["score_low"] <= s["score"] <= s["score_high"] for s in (base, d64, d128))
    assert base["reference"] == "self" and base["p_value"] is None
    assert d64["reference"] == "baseline" and d64["test"] == "mcnemar-exact" and d64["n_paired"] == 3
    # d64 is right on q1 only, the baseline on q1, q2: one discordant pair -> p = 1
    assert d64["discordant"] == [0, 1] and d64["p_value"] == 1.0 and d64["significant"] is False
    assert d64["delta"] == pytest.approx(-100 / 3)


def test_report_files_rebuild_identically(tmp_path):
    run = _make_run(tmp_path)
    build_report(run)
    md = (run / "report.md").read_text()
    assert "### m / t (exact)" in md and "| divprune | 64 | 64.0 | 33.33 | [" in md
    assert "| -33.33 n.s. | 1.000 / 1.000 | 66.7 | 1 | 0.5 | 0.25 |" in md and "| ref |" in md
    with (run / "report.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["method"] for r in table] == ["baseline", "divprune", "divprune"]
    assert float(table[2]["score"]) == 100.0 and {"score_low", "score_high", "p_value", "p_bh", "delta_low"} <= set(table[0])
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
    assert "| score | 95% CI | attribute | count | exist |" in header
    assert "| 60.00 | [" in table and "] | 100.00 | 50.00 | 50.00 |" in table
    one_type = summarize_cell(meta, [dict(r, qtype="count") for r in rows], None)
    assert "qtypes" not in one_type  # a single type adds nothing to the overall score


def _binary_run(tmp_path, cells, tflops=1e-3):
    """A run of exact-match cells: ``cells`` maps (method, budget, kept) to a 0/1 list per question."""
    run = tmp_path / "run"
    (run / "cells").mkdir(parents=True)
    (run / "rows").mkdir()
    ids = []
    for i, ((method, budget, kept), right) in enumerate(cells.items()):
        cid = f"m__t__{method}-{budget}__h{i}"
        rows = [_row(f"q{j}", "yes" if ok else "no", "yes", kept, tflops * 1e12) for j, ok in enumerate(right)]
        write_rows(run / "rows" / f"{cid}.jsonl", rows)
        (run / "cells" / f"{cid}.json").write_text(json.dumps({"id": cid, "model": "m", "task": "t", "method": method,
                                                               "budget": budget, "metric": "exact"}))
        ids.append(cid)
    (run / "run.json").write_text(json.dumps({"name": "demo", "cells": ids}))
    return run


def test_issue_example_is_not_significant(tmp_path):
    # 30 questions: the baseline is right on 19 (63.3%), random@64 on 21 (70.0%): it is right on two more, wrong on
    # none the baseline got. Exact McNemar: 2 discordant pairs, both one way: p = 2 x 0.5^2 = 0.5
    base = [1] * 19 + [0] * 11
    rand = [1] * 21 + [0] * 9
    run = _binary_run(tmp_path, {("baseline", None, 576): base, ("random", 64, 64): rand})
    summaries = {s["method"]: s for s in build_report(run)}
    r = summaries["random"]
    assert r["score"] == pytest.approx(70.0) and r["discordant"] == [2, 0] and r["p_value"] == pytest.approx(0.5)
    assert r["significant"] is False and r["delta"] == pytest.approx(20 / 3)
    # the interval is wide: about +-16 points at n = 30 (normal approximation: 1.96 x sqrt(.7 x .3 / 30) = 16.4)
    assert 25 < r["score_high"] - r["score_low"] < 40
    assert build_report(run)[1]["score_low"] == r["score_low"]   # seeded: the same interval every time
    md = (run / "report.md").read_text()
    assert "| +6.67 n.s. | 0.500 / 0.500 |" in md and "GFLOPs" in md   # 1e-3 TFLOPs per question: printed in GFLOPs
    # a clear difference is marked significant: right on 12 more, wrong on none
    run2 = _binary_run(tmp_path / "b", {("baseline", None, 576): [0] * 12 + [1] * 18, ("pool", 64, 64): [1] * 30})
    s = build_report(run2)[1]
    assert s["p_value"] == pytest.approx(2 * 0.5 ** 12) and s["significant"] is True
    assert "| +40.00 | <0.001 / <0.001 |" in (run2 / "report.md").read_text()


def test_significance_is_adjusted_over_the_table(tmp_path):
    # right on 8 more, wrong on 1: p = 2 x P(X >= 8 | 9, 1/2) = 2 x 10 / 512 = 0.039, significant alone ...
    base = [0] * 8 + [1] + [1] * 11
    lucky = [1] * 8 + [0] + [1] * 11
    alone = build_report(_binary_run(tmp_path / "a", {("baseline", None, 576): base, ("pool", 64, 64): lucky}))[1]
    assert alone["p_value"] == pytest.approx(20 / 512) and alone["significant"] is True
    # ... but not as one of four comparisons: Benjamini-Hochberg 0.039 x 4 / 1 = 0.156
    cells = {("baseline", None, 576): base, ("pool", 64, 64): lucky, ("random", 64, 64): base, ("tome", 64, 64): base,
             ("uniform", 64, 64): base}
    s = {x["method"]: x for x in build_report(_binary_run(tmp_path / "b", cells))}
    assert s["pool"]["p_value"] == pytest.approx(20 / 512) and s["pool"]["p_bh"] == pytest.approx(4 * 20 / 512)
    assert s["pool"]["significant"] is False


def test_reference_without_a_baseline(tmp_path):
    # tiny-mqt runs no uncompressed cell: the cell with the most visual tokens is the reference, and the table says so
    run = _binary_run(tmp_path, {("mqt", 16, 16): [1, 0, 0, 1], ("mqt", 256, 256): [1, 1, 0, 1], ("mqt", 64, 64): [1, 1, 0, 0]})
    s = build_report(run)
    assert [x["reference"] for x in s] == ["mqt@256", "self", "mqt@256"]
    assert s[0]["delta"] == pytest.approx(-25.0) and s[1]["agreement"] == 100.0
    assert "### m / t (exact; reference: mqt@256)" in (run / "report.md").read_text()


def test_flops_unit():
    from vtc.bench.report import flops_unit

    assert flops_unit([8.2, 3.1]) == ("TFLOPs", 1.0)
    assert flops_unit([0.0042, None, float("nan")]) == ("GFLOPs", 1e3)
    assert flops_unit([2e-5]) == ("MFLOPs", 1e6)


def test_submission_for_questions_without_answers(tmp_path):
    run = tmp_path / "run"
    (run / "cells").mkdir(parents=True)
    (run / "rows").mkdir()
    rows = [{"qid": "101", "prediction": "Two Dogs.", "answers": [], "score": None, "error": None, "kept_tokens": 64},
            {"qid": "102", "prediction": "STOP", "answers": [], "score": None, "error": None, "kept_tokens": 64}]
    write_rows(run / "rows" / "m__tv__baseline__h.jsonl", rows)
    (run / "cells" / "m__tv__baseline__h.json").write_text(json.dumps(
        {"id": "m__tv__baseline__h", "model": "m", "task": "tv", "method": "baseline", "metric": "textvqa"}))
    (s,) = build_report(run)
    assert math.isnan(s["score"]) and s["unanswered"] == 2 and s["submission"] == "submissions/m__tv__baseline__h.json"
    assert json.loads((run / s["submission"]).read_text()) == [{"question_id": 101, "answer": "2 dogs"},
                                                                {"question_id": 102, "answer": "stop"}]
    assert "submission files: submissions/m__tv__baseline__h.json" in (run / "report.md").read_text()
