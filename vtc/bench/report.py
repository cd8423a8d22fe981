"""Reports of a bench run: a summary per cell, a Markdown table, a CSV and plots, rebuilt from rows.

:func:`build_report` reads ``RUN_DIR/cells/*.json`` (what each cell is, its latency profile) and
``RUN_DIR/rows/*.jsonl`` (one row per question) and writes

- ``summary.jsonl``: one summary per cell (:func:`summarize_cell`);
- ``report.md``: a table per (model, task);
- ``report.csv``: every summary field, one line per cell;
- ``plots/<model>__<task>__tokens.png`` and ``...__tflops.png`` (:mod:`vtc.bench.plots`).

Scores exclude error rows (their count is reported). Agreement is the share of questions on which
a cell's normalised answer equals the uncompressed model's. FLOPs and token counts are means per
question; latency figures are medians of the cell's profile. ``vtc report RUN_DIR`` calls this.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vtc.bench.files import atomic_open, read_json, write_text
from vtc.bench.metrics import agreement, get_metric
from vtc.bench.rows import cell_rows
from vtc.errors import ConfigError

__all__ = ["summarize_cell", "build_report", "load_cells", "markdown_table", "COLUMNS"]

#: (summary key, Markdown header, format) of the report table
COLUMNS: list[tuple[str, str, str]] = [
    ("method", "method", "s"), ("budget", "budget", "s"), ("kept_tokens", "visual tokens", ".1f"),
    ("score", "score", ".2f"), ("agreement", "agree %", ".1f"), ("tflops", "TFLOPs", ".4g"),
    ("tflops_prefill", "prefill TFLOPs", ".4g"), ("fastv_tflops", "FastV TFLOPs", ".4g"),
    ("ttft_ms", "TTFT ms", ".1f"), ("tpot_ms", "TPOT ms", ".1f"), ("peak_mem_mib", "peak MiB", ".0f"),
    ("answered", "n", "d"), ("errors", "errors", "d"), ("applied", "applied", "s"),
]


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize_cell(meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                   baseline_rows: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """One cell's summary from its rows, its metadata and (for agreement) the baseline's rows."""
    ok = [r for r in rows if not r.get("error")]
    out: dict[str, Any] = {k: meta.get(k) for k in ("id", "model", "task", "method", "budget", "metric", "pipeline")}
    metric = get_metric(meta.get("metric") or "vqa")
    scored = metric.summarize(ok)
    out["score"] = scored.pop("score")
    scored.pop("n", None)
    qtypes = sorted({str(r["qtype"]) for r in ok if r.get("qtype")})
    if len(qtypes) > 1:  # per question type, e.g. the counting questions of the embedded model's data
        out["qtypes"] = qtypes
        for qt in qtypes:
            out[f"score[{qt}]"] = metric.summarize([r for r in ok if r.get("qtype") == qt])["score"]
    out.update({f"{meta.get('metric')}_{k}": v for k, v in scored.items()})
    out["rows"], out["answered"], out["errors"] = len(rows), len(ok), len(rows) - len(ok)
    if meta.get("method") == "baseline":
        out["agreement"] = 100.0 if ok else float("nan")
    elif baseline_rows is not None:
        base = {r["qid"]: r["prediction"] for r in baseline_rows if not r.get("error") and r.get("prediction") is not None}
        out["agreement"], out["agreement_n"] = agreement(ok, base)
    else:
        out["agreement"] = float("nan")
    for key in ("visual_tokens", "kept_tokens", "text_tokens", "new_tokens", "time_s"):
        out[key] = _mean([r.get(key) for r in ok])
    flops = [r.get("flops") or {} for r in ok]
    for key, name in (("total", "tflops"), ("vision", "tflops_vision"), ("projector", "tflops_projector"),
                      ("ops", "tflops_ops"), ("prefill", "tflops_prefill"), ("decode", "tflops_decode"),
                      ("fastv_compat", "fastv_tflops")):
        out[name] = _mean([f.get(key) for f in flops]) / 1e12
    out["kv_cache_mib"] = _mean([f.get("kv_cache_bytes") for f in flops]) / 2**20
    # layer-average visual tokens (in-LLM pruning makes it differ from the tokens at the LLM input)
    out["equivalent_tokens"] = _mean([f.get("equivalent_tokens") for f in flops])
    applied = {bool(r.get("applied", True)) for r in rows}
    out["applied"] = "yes" if applied == {True} else ("no" if applied == {False} else "partly") if rows else "-"
    lat = meta.get("latency") or {}
    for stage in ("vision", "projector", "operators", "prefill", "ttft", "tpot"):
        out[f"{stage}_ms"] = (lat.get(f"{stage}_ms") or {}).get("median", float("nan"))
    out["ttft_p90_ms"] = (lat.get("ttft_ms") or {}).get("p90", float("nan"))
    mem = lat.get("peak_mem_bytes")
    out["peak_mem_mib"] = mem / 2**20 if mem is not None else float("nan")
    out["peak_mem_kind"] = lat.get("peak_mem_kind")
    env = meta.get("env") or {}
    out.update({f"env_{k}": v for k, v in env.items()})
    return out


def load_cells(run_dir: str | Path) -> list[dict[str, Any]]:
    """Cell metadata of the run, in run order (the latest config's cells when ``run.json`` lists them)."""
    run_dir = Path(run_dir)
    cdir = run_dir / "cells"
    if not cdir.is_dir():
        raise ConfigError(f"{str(run_dir)!r} is not a vtc bench run folder (no cells/ inside)")
    fix = "rerun `vtc bench` with the config that made it (it rebuilds the file from the rows) or delete the file"
    metas = {p.stem: read_json(p, fix=fix) for p in sorted(cdir.glob("*.json"))}
    order_file = run_dir / "run.json"
    if order_file.is_file():
        ids = read_json(order_file, fix=fix).get("cells", [])
        return [metas[i] for i in ids if i in metas]
    return list(metas.values())


def _cell_rows(run_dir: Path, cell_id: str) -> list[dict[str, Any]]:
    return cell_rows(run_dir, cell_id)  # the runner's summaries read rows the same way


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if spec == "s":
        return str(v)
    if spec == "d":
        return str(int(v))
    return format(v, spec)


def _in_llm_pruned(s: Mapping[str, Any]) -> bool:
    eq, kept = s.get("equivalent_tokens"), s.get("kept_tokens")
    return eq is not None and kept is not None and not math.isnan(eq) and not math.isclose(eq, kept)


def markdown_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one table per (model, task)."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for s in summaries:
        groups.setdefault((s["model"], s["task"]), []).append(s)
    parts = []
    for (model, task), items in groups.items():
        metric = items[0].get("metric")
        qtypes = sorted({qt for s in items for qt in s.get("qtypes") or ()})
        at = [k for k, _, _ in COLUMNS].index("score") + 1
        cols = COLUMNS[:at] + [(f"score[{qt}]", qt, ".2f") for qt in qtypes] + COLUMNS[at:]
        if any(_in_llm_pruned(s) for s in items):  # layer-average visual tokens next to those at the LLM input
            at = [k for k, _, _ in cols].index("kept_tokens") + 1
            cols = cols[:at] + [("equivalent_tokens", "equiv. tokens", ".1f")] + cols[at:]
        parts.append(f"### {model} / {task} ({metric})\n")
        parts.append("| " + " | ".join(h for _, h, _ in cols) + " |")
        parts.append("|" + "|".join("---" for _ in cols) + "|")
        for s in items:
            parts.append("| " + " | ".join(_fmt(s.get(k), f) for k, _, f in cols) + " |")
        parts.append("")
    return "\n".join(parts)


def _jsonable(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def build_report(run_dir: str | Path, plots: bool = True) -> list[dict[str, Any]]:
    """Rebuild summaries, ``report.md``, ``report.csv`` and the plots of a run from its rows."""
    run_dir = Path(run_dir)
    metas = load_cells(run_dir)
    rows = {m["id"]: _cell_rows(run_dir, m["id"]) for m in metas}
    baselines = {(m["model"], m["task"]): rows[m["id"]] for m in metas if m.get("method") == "baseline"}
    summaries = [summarize_cell(m, rows[m["id"]], baselines.get((m["model"], m["task"]))) for m in metas]
    with atomic_open(run_dir / "summary.jsonl") as fh:
        for s in summaries:
            fh.write(json.dumps({k: _jsonable(v) for k, v in s.items()}) + "\n")
    keys: list[str] = []
    for s in summaries:
        keys += [k for k in s if k not in keys]
    with atomic_open(run_dir / "report.csv", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for s in summaries:
            w.writerow({k: ("" if _jsonable(s.get(k)) is None else s.get(k)) for k in keys})
    title = json.loads((run_dir / "run.json").read_text()).get("name", run_dir.name) if (run_dir / "run.json").is_file() \
        else run_dir.name
    md = [f"# vtc bench: {title}\n", markdown_table(summaries)]
    env = next((m.get("env") for m in metas if m.get("env")), None)
    if env:
        md.append("Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()) + "\n")
    md.append("Scores in percent (yesno: F1). TFLOPs: analytic, mean per question (vtc.bench.flops); "
              "FastV TFLOPs: T·(4nd²+2n²d+2ndm) of the LLM prefill. Latency: medians of the cell's profile. "
              "applied=no: the pipeline could not be attached and the model ran uncompressed.\n")
    if plots and summaries:
        from vtc.bench.plots import plot_run

        made = plot_run(summaries, run_dir / "plots")
        md.append("Plots: " + ", ".join(f"[{p.name}](plots/{p.name})" for p in made) + "\n")
    write_text(run_dir / "report.md", "\n".join(md))
    return summaries
