"""PNG plots of a bench run: accuracy vs visual tokens and accuracy vs TFLOPs, one line per method.

One figure pair per (model, task). Each method's cells are joined in order of their x value; the
uncompressed baseline is a star with a dashed horizontal line at its score; a method whose pipeline
could not be attached (it ran uncompressed) is drawn hollow and flagged in the legend. matplotlib runs on
the non-interactive Agg backend, so plotting works on machines without a display.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vtc.bench.files import atomic_open

__all__ = ["plot_run", "AXES"]

#: x-axis summary key -> (file suffix, axis label)
AXES = {"kept_tokens": ("tokens", "visual tokens per image (mean)"), "tflops": ("tflops", "TFLOPs per question (mean)")}


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(s)).strip("-") or "x"


def _ok(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def plot_run(summaries: Sequence[Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write the plots for every (model, task) in ``summaries``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for s in summaries:
        groups.setdefault((s["model"], s["task"]), []).append(s)
    written = []
    for (model, task), items in groups.items():
        metric = items[0].get("metric") or "score"
        for key, (suffix, label) in AXES.items():
            fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
            methods: dict[str, list[tuple[float, float]]] = {}
            unapplied = set()
            for s in items:
                if _ok(s.get(key)) and _ok(s.get("score")):
                    methods.setdefault(s["method"], []).append((float(s[key]), float(s["score"])))
                    if s.get("applied") == "no":
                        unapplied.add(s["method"])
            for method, pts in sorted(methods.items()):
                pts.sort()
                xs, ys = zip(*pts)
                if method == "baseline":
                    ax.scatter(xs, ys, marker="*", s=140, color="black", zorder=1, label="uncompressed")
                    ax.axhline(ys[0], color="black", linestyle="--", linewidth=0.8, zorder=1)
                elif method in unapplied:  # ran uncompressed: hollow markers, flagged in the legend
                    ax.plot(xs, ys, marker="o", linestyle=":", markerfacecolor="none", label=f"{method} (not applied)")
                else:
                    ax.plot(xs, ys, marker="o", label=method)
            ax.set_xlabel(label)
            ax.set_ylabel(f"{metric} score (%)")
            ax.set_title(f"{model} / {task}")
            ax.grid(True, alpha=0.3)
            if methods:
                ax.legend(fontsize=8)
            fig.tight_layout()
            path = out_dir / f"{_safe(model)}__{_safe(task)}__{suffix}.png"
            with atomic_open(path, "wb") as fh:
                fig.savefig(fh, format="png")
            plt.close(fig)
            written.append(path)
    return written
