"""Reports of a bench run: a summary per cell, a Markdown table, a CSV, plots and submission files, from rows.

:func:`build_report` reads ``RUN_DIR/cells/*.json`` (what each cell is, its latency and memory)
and ``RUN_DIR/rows/*.jsonl`` (one row per question) and writes

- ``summary.jsonl``: one summary per cell (:func:`summarize_cell`);
- ``report.md``: a table per (model, task);
- ``report.csv``: every summary field, one line per cell;
- ``plots/<model>__<task>__tokens.png`` and ``...__tflops.png`` with error bars (:mod:`vtc.bench.plots`);
- ``submissions/<cell>.json`` for questions without public answers (TextVQA / VizWiz / VQAv2
  test splits): the predictions in the format the benchmark's evaluation server takes.

Each cell's score carries its 95% bootstrap interval (``score_low``, ``score_high``) and, except
for the reference cell, a paired test against it on the same questions (``delta``,
``delta_low``, ``delta_high``, ``p_value``, ``test``; ``p_bh``: Benjamini-Hochberg adjusted over
the table's cells, and ``significant``: ``p_bh`` < 0.05); see :mod:`vtc.bench.stats`. The reference of a (model, task) table is
the uncompressed baseline, or, where the config runs none (``tiny-mqt``: MQT always compresses),
the cell with the most visual tokens, which the table names. The Markdown table marks a
difference that is not significant with ``n.s.``.

Scores exclude error rows (their count is reported). Agreement is the share of questions on which
a cell's answer equals the reference's. FLOPs and token counts are means per question, printed in
the unit that suits the table's model (TFLOPs, GFLOPs or MFLOPs; ``tflops*`` fields stay in
TFLOPs); latency figures are medians of the cell's profile; peak memory is the cell's own
(:mod:`vtc.bench.memory`). ``vtc report RUN_DIR`` calls this.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vtc.bench.files import atomic_open, read_json, write_text
from vtc.bench.metrics import agreement, get_metric, scored
from vtc.bench.rows import cell_rows
from vtc.bench.stats import ALPHA, adjust, interval, paired_test
from vtc.errors import ConfigError

__all__ = ["summarize_cell", "build_report", "load_cells", "markdown_table", "flops_unit", "COLUMNS"]

#: (summary key, Markdown header, format) of the report table; "{F}" is the table's FLOPs unit
COLUMNS: list[tuple[str, str, str]] = [
    ("method", "method", "s"), ("budget", "budget", "s"), ("kept_tokens", "visual tokens", ".1f"),
    ("score", "score", ".2f"), ("score_ci", "95% CI", "ci"), ("delta", "Δ vs ref", "delta"), ("p_value", "p / p_BH", "p"),
    ("agreement", "agree %", ".1f"), ("tflops", "{F}", "flops"), ("tflops_prefill", "prefill {F}", "flops"),
    ("fastv_tflops", "FastV {F}", "flops"), ("ttft_ms", "TTFT ms", ".1f"), ("tpot_ms", "TPOT ms", ".1f"),
    ("peak_mem_mib", "peak MiB", ".0f"), ("answered", "n", "d"), ("errors", "errors", "d"), ("applied", "applied", "s"),
]

_UNITS = (("TFLOPs", 1.0), ("GFLOPs", 1e3), ("MFLOPs", 1e6))


def flops_unit(tflops: Sequence[float]) -> tuple[str, float]:
    """``(name, factor)``: the unit in which the largest of ``tflops`` reads >= 1 (TFLOPs, GFLOPs, MFLOPs)."""
    vals = [v for v in tflops if v is not None and math.isfinite(v) and v > 0]
    top = max(vals) if vals else 1.0
    for name, factor in _UNITS:
        if top * factor >= 1.0:
            return name, factor
    return _UNITS[-1]


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize_cell(meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                   baseline_rows: Sequence[Mapping[str, Any]] | None = None,
                   reference: tuple[str, Sequence[Mapping[str, Any]]] | None = None) -> dict[str, Any]:
    """One cell's summary from its rows and metadata.

    ``baseline_rows``: the uncompressed model's rows (agreement, and the paired test when
    ``reference`` is not given); ``reference``: ``(label, rows)`` of the cell to test against.
    """
    ok = [r for r in rows if not r.get("error")]
    out: dict[str, Any] = {k: meta.get(k) for k in ("id", "model", "task", "method", "budget", "metric", "pipeline")}
    metric = get_metric(meta.get("metric") or "vqa")
    out["reference_scorer"] = metric.reference
    scored_rows = scored(ok)
    summary = metric.summarize(scored_rows)
    out["score"] = summary.pop("score")
    summary.pop("n", None)
    out["score_low"], out["score_high"] = interval(metric, scored_rows)
    qtypes = sorted({str(r["qtype"]) for r in scored_rows if r.get("qtype")})
    if len(qtypes) > 1:  # per question type, e.g. the counting questions of the embedded model's data
        out["qtypes"] = qtypes
        for qt in qtypes:
            out[f"score[{qt}]"] = metric.summarize([r for r in scored_rows if r.get("qtype") == qt])["score"]
    out.update({f"{metric.name}_{k}": v for k, v in summary.items()})
    out["rows"], out["answered"], out["errors"] = len(rows), len(ok), len(rows) - len(ok)
    out["scored"], out["unanswered"] = len(scored_rows), len([r for r in ok if not r.get("answers")])
    if reference is None and baseline_rows is not None and meta.get("method") != "baseline":
        reference = ("baseline", baseline_rows)
    is_ref = meta.get("method") == "baseline" if reference is None else False
    ref_rows = reference[1] if reference is not None else None
    out["reference"] = "self" if is_ref else (reference[0] if reference is not None else None)
    if is_ref:
        out["agreement"] = 100.0 if ok else float("nan")
    elif ref_rows is not None:
        base = {r["qid"]: r["prediction"] for r in ref_rows if not r.get("error") and r.get("prediction") is not None}
        out["agreement"], out["agreement_n"] = agreement(ok, base)
    else:
        out["agreement"] = float("nan")
    test = paired_test(metric, scored_rows, scored(ref_rows)) if ref_rows is not None and scored_rows else None
    for key in ("delta", "delta_low", "delta_high", "p_value", "test", "n_paired", "discordant"):
        out[key] = (test or {}).get(key)
    p = out["p_value"]
    out["significant"] = bool(p < ALPHA) if p is not None and math.isfinite(p) else None
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
    mem = meta.get("memory") or {}
    if mem.get("peak_bytes") is not None:
        out["peak_mem_mib"], out["peak_mem_kind"] = mem["peak_bytes"] / 2**20, mem.get("kind")
        out["mem_base_mib"] = mem["base_bytes"] / 2**20 if mem.get("base_bytes") is not None else float("nan")
    else:
        out["peak_mem_mib"], out["peak_mem_kind"] = float("nan"), None
    if lat.get("peak_mem_bytes") is not None:  # the latency profile's own figure (one batch), kept beside
        out["profile_peak_mem_mib"] = lat["peak_mem_bytes"] / 2**20
        out["profile_peak_mem_kind"] = lat.get("peak_mem_kind")
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


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt(s: Mapping[str, Any], key: str, spec: str, factor: float) -> str:
    if spec == "ci":
        lo, hi = s.get("score_low"), s.get("score_high")
        return "-" if _nan(lo) or _nan(hi) else f"[{lo:.2f}, {hi:.2f}]"
    if spec == "delta":
        if s.get("reference") == "self":
            return "ref"
        d = s.get("delta")
        if _nan(d):
            return "-"
        return f"{d:+.2f}" + (" n.s." if s.get("significant") is False else "")
    v = s.get(key)
    if _nan(v):
        return "-"
    if spec == "p":
        def p(x: float) -> str:
            return f"{x:.3f}" if x >= 0.001 else "<0.001"

        q = s.get("p_bh")
        return p(v) + ("" if _nan(q) else f" / {p(q)}")
    if spec == "flops":
        return format(v * factor, ".4g")
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
        unit, factor = flops_unit([s.get("tflops") for s in items])
        qtypes = sorted({qt for s in items for qt in s.get("qtypes") or ()})
        at = [k for k, _, _ in COLUMNS].index("score_ci") + 1
        cols = COLUMNS[:at] + [(f"score[{qt}]", qt, ".2f") for qt in qtypes] + COLUMNS[at:]
        if any(_in_llm_pruned(s) for s in items):  # layer-average visual tokens next to those at the LLM input
            at = [k for k, _, _ in cols].index("kept_tokens") + 1
            cols = cols[:at] + [("equivalent_tokens", "equiv. tokens", ".1f")] + cols[at:]
        ref = next((s for s in items if s.get("reference") == "self"), None)
        named = next((s.get("reference") for s in items if s.get("reference") not in (None, "self")), None)
        note = "" if ref is None or ref.get("method") == "baseline" else f"; reference: {named}"
        parts.append(f"### {model} / {task} ({metric}{note})\n")
        parts.append("| " + " | ".join(h.replace("{F}", unit) for _, h, _ in cols) + " |")
        parts.append("|" + "|".join("---" for _ in cols) + "|")
        for s in items:
            parts.append("| " + " | ".join(_fmt(s, k, f, factor) for k, _, f in cols) + " |")
        parts.append("")
    return "\n".join(parts)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):  # numpy scalars
        return _jsonable(v.item())
    return v


def _label(meta: Mapping[str, Any]) -> str:
    return str(meta["method"]) if meta.get("budget") is None else f"{meta['method']}@{meta['budget']}"


def _reference(metas: Sequence[Mapping[str, Any]], rows: Mapping[str, list[dict[str, Any]]]) -> Mapping[str, Any] | None:
    """The group's reference cell: the baseline, else the cell with the most visual tokens at the LLM."""
    base = [m for m in metas if m.get("method") == "baseline"]
    if base:
        return base[0]
    kept = [(_mean([r.get("kept_tokens") for r in rows[m["id"]] if not r.get("error")]), i) for i, m in enumerate(metas)]
    kept = [(k, i) for k, i in kept if not math.isnan(k)]
    return metas[max(kept, key=lambda t: (t[0], -t[1]))[1]] if kept else None


def _write_submissions(run_dir: Path, metas: Sequence[Mapping[str, Any]], rows: Mapping[str, list[dict[str, Any]]],
                       summaries: list[dict[str, Any]]) -> None:
    for meta, s in zip(metas, summaries):
        open_rows = [r for r in rows[meta["id"]] if not r.get("answers") and not r.get("error")]
        if not open_rows:
            continue
        records = get_metric(meta.get("metric") or "vqa").submission(open_rows)
        if records is None:
            records = [{"question_id": r["qid"], "prediction": r.get("prediction")} for r in open_rows]
        path = run_dir / "submissions" / f"{meta['id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(records, indent=1, ensure_ascii=False))
        s["submission"] = str(path.relative_to(run_dir))


def build_report(run_dir: str | Path, plots: bool = True) -> list[dict[str, Any]]:
    """Rebuild summaries, ``report.md``, ``report.csv``, the plots and submissions of a run from its rows."""
    run_dir = Path(run_dir)
    metas = load_cells(run_dir)
    rows = {m["id"]: _cell_rows(run_dir, m["id"]) for m in metas}
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for m in metas:
        groups.setdefault((m["model"], m["task"]), []).append(m)
    refs = {key: _reference(items, rows) for key, items in groups.items()}
    summaries = []
    for m in metas:
        ref = refs[(m["model"], m["task"])]
        if ref is None or ref["id"] == m["id"]:
            s = summarize_cell(m, rows[m["id"]], None)
            if ref is not None:
                s["reference"], s["agreement"] = "self", (100.0 if s["answered"] else float("nan"))
        else:
            s = summarize_cell(m, rows[m["id"]], None, reference=(_label(ref), rows[ref["id"]]))
        summaries.append(s)
    for key in groups:  # Benjamini-Hochberg within each table
        items = [s for s in summaries if (s["model"], s["task"]) == key]
        for s, q in zip(items, adjust([s["p_value"] if s.get("p_value") is not None else float("nan") for s in items])):
            s["p_bh"] = q
            s["significant"] = bool(q < ALPHA) if math.isfinite(q) else None
    _write_submissions(run_dir, metas, rows, summaries)
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
            w.writerow({k: ("" if _jsonable(s.get(k)) is None else _jsonable(s.get(k))) for k in keys})
    title = json.loads((run_dir / "run.json").read_text()).get("name", run_dir.name) if (run_dir / "run.json").is_file() \
        else run_dir.name
    md = [f"# vtc bench: {title}\n", markdown_table(summaries)]
    env = next((m.get("env") for m in metas if m.get("env")), None)
    if env:
        md.append("Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()) + "\n")
    md.append(_notes(summaries))
    if plots and summaries:
        from vtc.bench.plots import plot_run

        made = plot_run(summaries, run_dir / "plots")
        md.append("Plots: " + ", ".join(f"[{p.name}](plots/{p.name})" for p in made) + "\n")
    subs = [s["submission"] for s in summaries if s.get("submission")]
    if subs:
        md.append("Questions without public answers (no score); submission files: " + ", ".join(subs) + "\n")
    write_text(run_dir / "report.md", "\n".join(md))
    return summaries


_MEMORY = {
    "cuda_max_allocated": "CUDA max allocated during the cell (weights included)",
    "cpu_rss_growth": "CPU: growth of the resident memory over its size at the cell's start (the model and "
                      "everything already live), not the whole process",
    "cpu_rss_growth_lifetime": "CPU: growth of the process's lifetime peak resident memory during the cell (a lower bound)",
}


def _notes(summaries: Sequence[Mapping[str, Any]]) -> str:
    metrics = sorted({s.get("metric") or "vqa" for s in summaries})
    scorers = "; ".join(f"{m}: {get_metric(m).headline_label}, as {get_metric(m).reference}" for m in metrics)
    kinds = sorted({s.get("peak_mem_kind") for s in summaries if s.get("peak_mem_kind")})
    mem = " / ".join(_MEMORY.get(k, k) for k in kinds) or "not measured"
    return (f"Scores with their 95% bootstrap interval over questions ({scorers}). "
            f"Δ vs ref: the difference from the table's reference (the uncompressed model unless named) on the same "
            f"questions; p: exact McNemar test for right/wrong scores, else paired bootstrap; p_BH: p adjusted for the "
            f"table's several comparisons (Benjamini-Hochberg); n.s.: not significant, p_BH >= {ALPHA}. "
            f"FLOPs: analytic, mean per question (vtc.bench.flops); FastV: T·(4nd²+2n²d+2ndm) of the LLM prefill. "
            f"Latency: medians of the cell's profile. Peak MiB: {mem}. "
            f"applied=no: the pipeline could not be attached and the model ran uncompressed.\n")
