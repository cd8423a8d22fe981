"""Uncertainty of bench scores: a bootstrap interval per cell, a paired test against the reference cell.

Every score vtc shows carries:

- **a 95% bootstrap interval** (:func:`interval`): the cell's units (questions; MME images;
  MMBench questions with their circular passes; see :meth:`vtc.bench.metrics.Metric.units`) are
  resampled with replacement, within strata where the metric has them (MME's subtasks), and the
  headline is recomputed on each resample; the interval is the 2.5th and 97.5th percentiles of
  :data:`N_RESAMPLES` resamples (``scipy.stats.bootstrap``, percentile method, seeded: the same
  rows always give the same interval). For VQA the unit's value is its 10-choose-9 accuracy.
- **a paired test against the reference cell** (:func:`paired_test`), on the units both cells
  answered: when each unit scores 0 or 1 and the headline is their mean (exact match, multiple
  choice, MMBench CircularEval, ...), the exact McNemar test, i.e. the two-sided binomial test
  of the discordant pairs (``scipy.stats.binomtest``, p = 0.5); otherwise (VQA accuracy, POPE's
  F1, MME's totals) a paired bootstrap: units resampled jointly, the difference of the two
  headlines recomputed, and p = (1 + #{|d* - d| >= |d|}) / (B + 1), the share of the
  difference's bootstrap distribution, shifted to the null, at least as far from zero as the
  observed difference. Both report the difference and its paired 95% interval.

A table compares many cells with one reference, and some small p-values arise by chance: the
report adjusts them over the table (Benjamini-Hochberg, ``scipy.stats.false_discovery_control``,
:func:`adjust`) and calls a difference *significant* when the adjusted p is below :data:`ALPHA`. Intervals and tests describe the questions
sampled, not the benchmark's other questions' difficulty, and they assume questions independent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from vtc.bench.metrics import Metric, UnitTable, scored

__all__ = ["interval", "paired_test", "adjust", "ALPHA", "CONFIDENCE", "N_RESAMPLES", "SEED"]

ALPHA = 0.05
CONFIDENCE = 0.95
N_RESAMPLES = 2000
SEED = 0
_GENERIC_RESAMPLES = 500  # metrics that only define summarize() are recomputed row by row


def _generic(metric: Metric) -> bool:
    """True for a metric that overrides ``summarize`` but not ``units`` (a plugin): resample rows."""
    cls = type(metric)
    return cls.units is Metric.units and cls.summarize is not Metric.summarize


def _strata(table: UnitTable) -> tuple[list[np.ndarray], np.ndarray]:
    """Index arrays of the strata resampled (two or more units) and the units held fixed (a lone unit)."""
    groups = [np.flatnonzero(table.strata == s) for s in np.unique(table.strata)]
    fixed = [g for g in groups if len(g) < 2]
    return [g for g in groups if len(g) >= 2], (np.concatenate(fixed) if fixed else np.zeros(0, dtype=np.int64))


def _bootstrap(groups: list[np.ndarray], stat: Callable[..., np.ndarray], n_resamples: int, seed: int,
               vectorized: bool = True) -> Any:
    from scipy.stats import bootstrap

    return bootstrap(tuple(groups), stat, n_resamples=n_resamples, vectorized=vectorized, paired=False, axis=-1,
                     confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(seed),
                     batch=200 if vectorized else None)


def _sum_fn(values: np.ndarray, fixed: np.ndarray) -> Callable[..., np.ndarray]:
    base = values[fixed].sum(0)

    def sums(*idx: np.ndarray) -> np.ndarray:
        out = base
        for ix in idx:
            out = out + values[np.asarray(ix, dtype=np.int64)].sum(-2)
        return out

    return sums


def interval(metric: Metric, rows: Sequence[Mapping[str, Any]], *, n_resamples: int = N_RESAMPLES,
             seed: int = SEED) -> tuple[float, float]:
    """The 95% bootstrap interval of the cell's headline (NaN, NaN when fewer than two units)."""
    nan = (float("nan"), float("nan"))
    if _generic(metric):
        ok = scored(rows)
        if len(ok) < 2:
            return nan
        res = _bootstrap([np.arange(len(ok))], lambda ix: metric.summarize([ok[int(i)] for i in ix])["score"],
                         min(n_resamples, _GENERIC_RESAMPLES), seed, vectorized=False)
    else:
        table = metric.units(rows)
        groups, fixed = _strata(table)
        if not groups:
            return nan
        sums = _sum_fn(table.values, fixed)
        res = _bootstrap(groups, lambda *ix, axis=-1: metric.headline(sums(*ix)), n_resamples, seed)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_test(metric: Metric, rows: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]], *,
                n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict[str, Any]:
    """The cell against the reference cell on the units both answered (see the module docstring).

    Returns ``{"test", "p_value", "delta", "delta_low", "delta_high", "n_paired"}`` (``delta`` =
    cell minus reference, on the paired units) and, for McNemar, ``"discordant"``: ``[units only
    the cell got right, units only the reference got right]``.
    """
    out: dict[str, Any] = {"test": None, "p_value": float("nan"), "delta": float("nan"), "delta_low": float("nan"),
                           "delta_high": float("nan"), "n_paired": 0}
    if _generic(metric):
        return _paired_generic(metric, rows, reference, out, min(n_resamples, _GENERIC_RESAMPLES), seed)
    ta, tb = metric.units(rows), metric.units(reference)
    in_b = set(tb.keys)
    common = [k for k in ta.keys if k in in_b]
    out["n_paired"] = len(common)
    if not common:
        return out
    ta, tb = ta.subset(common), tb.subset(common)
    va, vb = ta.values, tb.values
    out["delta"] = float(metric.headline(va.sum(0)) - metric.headline(vb.sum(0)))
    groups, fixed = _strata(ta)
    if groups:
        sa, sb = _sum_fn(va, fixed), _sum_fn(vb, fixed)
        res = _bootstrap(groups, lambda *ix, axis=-1: metric.headline(sa(*ix)) - metric.headline(sb(*ix)), n_resamples, seed)
        out["delta_low"], out["delta_high"] = float(res.confidence_interval.low), float(res.confidence_interval.high)
        dist = np.asarray(res.bootstrap_distribution)
        dist = dist[np.isfinite(dist)]
        d = out["delta"]
        if dist.size and np.isfinite(d):
            out["p_value"] = float((1 + np.sum(np.abs(dist - d) >= abs(d) - 1e-12)) / (dist.size + 1))
    if metric.paired_test == "mcnemar":
        from scipy.stats import binomtest

        a, b = va[:, 0] > 0.5, vb[:, 0] > 0.5
        only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
        out["test"] = "mcnemar-exact"
        out["discordant"] = [only_a, only_b]
        out["p_value"] = float(binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0
    else:
        out["test"] = "paired-bootstrap"
    return out


def _paired_generic(metric: Metric, rows: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]],
                    out: dict[str, Any], n_resamples: int, seed: int) -> dict[str, Any]:
    ref = {str(r["qid"]): r for r in scored(reference)}
    pairs = [(r, ref[str(r["qid"])]) for r in scored(rows) if str(r["qid"]) in ref]
    out["n_paired"], out["test"] = len(pairs), "paired-bootstrap"
    if len(pairs) < 2:
        return out

    def diff(ix: np.ndarray) -> float:
        pick = [pairs[int(i)] for i in ix]
        return metric.summarize([p for p, _ in pick])["score"] - metric.summarize([q for _, q in pick])["score"]

    d = diff(np.arange(len(pairs)))
    res = _bootstrap([np.arange(len(pairs))], diff, n_resamples, seed, vectorized=False)
    dist = np.asarray(res.bootstrap_distribution)
    dist = dist[np.isfinite(dist)]
    out.update(delta=d, delta_low=float(res.confidence_interval.low), delta_high=float(res.confidence_interval.high))
    if dist.size and np.isfinite(d):
        out["p_value"] = float((1 + np.sum(np.abs(dist - d) >= abs(d) - 1e-12)) / (dist.size + 1))
    return out


def adjust(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (NaN stays NaN)."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = false_discovery_control(p[ok], method="bh")
    return [float(v) for v in out]
