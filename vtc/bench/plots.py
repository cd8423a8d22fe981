"""PNG plots of a bench run: accuracy vs visual tokens and accuracy vs FLOPs, one line per method.

One figure pair per (model, task). Each point carries its 95% bootstrap interval as an error bar;
each method's cells are joined in order of their x value; the reference (uncompressed) cell is a
star with a dashed horizontal line at its score and a shaded band over its interval; a method whose
pipeline could not be attached (it ran uncompressed) is drawn hollow and flagged in the legend.
FLOPs are drawn in the unit that suits the model (:func:`vtc.bench.report.flops_unit`). matplotlib
runs on the non-interactive Agg backend, so plotting works on machines without a display.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vtc.bench.files import atomic_open

__all__ = ["plot_run", "AXES"]

#: x-axis summary key -> (file suffix, axis label; "{F}" is the FLOPs unit)
AXES = {"kept_tokens": ("tokens", "visual tokens per image (mean)"), "tflops": ("tflops", "{F} per question (mean)")}


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(s)).strip("-") or "x"


def _ok(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def plot_run(summaries: Sequence[Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write the plots for every (model, task) in ``summaries``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from vtc.bench.report import flops_unit

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for s in summaries:
        groups.setdefault((s["model"], s["task"]), []).append(s)
    written = []
    for (model, task), items in groups.items():
        metric = items[0].get("metric") or "score"
        unit, factor = flops_unit([s.get("tflops") for s in items])
        for key, (suffix, label) in AXES.items():
            fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
            scale = factor if key == "tflops" else 1.0
            methods: dict[str, list[tuple[float, float, float, float]]] = {}
            unapplied, reference = set(), None
            for s in items:
                if _ok(s.get(key)) and _ok(s.get("score")):
                    lo = s["score_low"] if _ok(s.get("score_low")) else s["score"]
                    hi = s["score_high"] if _ok(s.get("score_high")) else s["score"]
                    pt = (float(s[key]) * scale, float(s["score"]), float(s["score"]) - lo, hi - float(s["score"]))
                    if s.get("reference") == "self":
                        reference = (s["method"], pt)
                        continue
                    methods.setdefault(s["method"], []).append(pt)
                    if s.get("applied") == "no":
                        unapplied.add(s["method"])
            if reference is not None:
                name, (x, y, dlo, dhi) = reference
                ax.errorbar([x], [y], yerr=[[dlo], [dhi]], marker="*", markersize=12, color="black", capsize=3,
                            linestyle="none", zorder=3, label="uncompressed" if name == "baseline" else f"{name} (reference)")
                ax.axhline(y, color="black", linestyle="--", linewidth=0.8, zorder=1)
                ax.axhspan(y - dlo, y + dhi, color="black", alpha=0.06, zorder=0)
            for method, pts in sorted(methods.items()):
                pts.sort()
                xs, ys, dlo, dhi = zip(*pts)
                style = dict(marker="o", capsize=3)
                if method in unapplied:  # ran uncompressed: hollow markers, flagged in the legend
                    style.update(linestyle=":", markerfacecolor="none")
                ax.errorbar(xs, ys, yerr=[dlo, dhi], label=f"{method} (not applied)" if method in unapplied else method,
                            **style)
            ax.set_xlabel(label.replace("{F}", unit))
            ax.set_ylabel(f"{metric} score (95% CI)")
            ax.set_title(f"{model} / {task}")
            ax.grid(True, alpha=0.3)
            if methods or reference is not None:
                ax.legend(fontsize=8)
            fig.tight_layout()
            path = out_dir / f"{_safe(model)}__{_safe(task)}__{suffix}.png"
            with atomic_open(path, "wb") as fh:
                fig.savefig(fh, format="png")
            plt.close(fig)
            written.append(path)
    return written
