"""Scores of predicted answers: VQA accuracy, exact match, yes/no accuracy and F1, agreement.

Each metric scores one prediction against the question's reference answers (``score``, a float in
[0, 1] written into the question's row) and summarises a cell's rows (``summarize``, a dict whose
``"score"`` entry is the headline number of the cell, in percent).

- ``vqa``: the standard VQA accuracy. With ``n`` human answers, a prediction earns
  ``min(#humans who gave it / 3, 1)`` against each of the ``n`` subsets of ``n - 1`` answers
  (10-choose-9 for VQAv2's ten), averaged. A question with a single reference answer falls back
  to exact match. Answers are compared after :func:`~vtc.bench.normalize.normalize_answer`.
- ``exact``: 1 when the normalised prediction equals any normalised reference answer.
- ``yesno``: POPE-style. The prediction is read as yes / no (:func:`~vtc.bench.normalize.yes_no`);
  the row scores 1 when it matches the reference. The summary reports accuracy, precision,
  recall and F1 with "yes" as the positive class, and the share of "yes" answers; the headline is
  F1, as POPE tables report.

:func:`agreement` compares a compressed run's predictions with the uncompressed model's on the
same questions (normalised exact agreement, in percent).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from vtc.bench.normalize import normalize_answer, yes_no
from vtc.errors import ConfigError

__all__ = ["Metric", "VQAAccuracy", "ExactMatch", "YesNo", "get_metric", "register_metric", "list_metrics",
           "vqa_accuracy", "agreement"]


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of ``prediction`` against the human ``answers`` (see the module docstring)."""
    if not answers:
        raise ConfigError("vqa accuracy needs at least one reference answer; this question has none")
    pred = normalize_answer(prediction)
    matches = [normalize_answer(a) == pred for a in answers]
    n, total = len(matches), sum(matches)
    if n == 1:
        return float(total)
    # leaving out answer i leaves total - matches[i] matching humans among n - 1
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / n


class Metric:
    """Base of the metrics: a per-question ``score`` and a per-cell ``summarize``."""

    name: ClassVar[str] = "metric"

    def score(self, prediction: str, answers: Sequence[str]) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def summarize(self, rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
        """``{"score": mean row score in percent, "n": rows scored}``; error rows are skipped."""
        scores = [r["score"] for r in rows if r.get("score") is not None]
        return {"score": 100.0 * sum(scores) / len(scores) if scores else float("nan"), "n": len(scores)}


_METRICS: dict[str, type[Metric]] = {}


def register_metric(name: str):
    """Class decorator registering a :class:`Metric` subclass under ``name``."""

    def deco(cls: type[Metric]) -> type[Metric]:
        cls.name = name
        _METRICS[name] = cls
        return cls

    return deco


@register_metric("vqa")
class VQAAccuracy(Metric):
    def score(self, prediction: str, answers: Sequence[str]) -> float:
        return vqa_accuracy(prediction, answers)


@register_metric("exact")
class ExactMatch(Metric):
    def score(self, prediction: str, answers: Sequence[str]) -> float:
        pred = normalize_answer(prediction)
        return float(any(normalize_answer(a) == pred for a in answers))


@register_metric("yesno")
class YesNo(Metric):
    def score(self, prediction: str, answers: Sequence[str]) -> float:
        gold = _gold_yes_no(answers)
        return float(yes_no(prediction) == gold)

    def summarize(self, rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
        tp = fp = fn = tn = other = 0
        for r in rows:
            if r.get("score") is None:
                continue
            pred, gold = yes_no(r["prediction"]), _gold_yes_no(r["answers"])
            if pred is None:
                other += 1
                pred = "no" if gold == "yes" else "yes"  # an unreadable answer is wrong either way
            if pred == "yes":
                tp, fp = tp + (gold == "yes"), fp + (gold == "no")
            else:
                fn, tn = fn + (gold == "yes"), tn + (gold == "no")
        n = tp + fp + fn + tn
        nan = float("nan")
        precision = tp / (tp + fp) if tp + fp else nan
        recall = tp / (tp + fn) if tp + fn else nan
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan
        return {
            "score": 100.0 * f1, "f1": 100.0 * f1, "accuracy": 100.0 * (tp + tn) / n if n else nan,
            "precision": 100.0 * precision, "recall": 100.0 * recall,
            "yes_ratio": 100.0 * (tp + fp) / n if n else nan, "unreadable": other, "n": n,
        }


def _gold_yes_no(answers: Sequence[str]) -> str:
    golds = {yes_no(a) for a in answers}
    if len(golds) != 1 or None in golds:
        raise ConfigError(f"the yesno metric needs reference answers that all say yes or all say no, got {list(answers)!r}")
    return golds.pop()


def get_metric(name: str) -> Metric:
    """An instance of the metric registered as ``name``."""
    try:
        return _METRICS[name]()
    except KeyError:
        raise ConfigError(f"unknown metric {name!r}; available: {', '.join(sorted(_METRICS))}") from None


def list_metrics() -> list[str]:
    return sorted(_METRICS)


def agreement(rows: Iterable[Mapping[str, Any]], baseline: Mapping[str, str]) -> tuple[float, int]:
    """Percent of ``rows`` whose normalised prediction equals the uncompressed model's.

    ``baseline`` maps question id to the uncompressed prediction. Returns ``(percent, n)`` over
    the questions answered (no error) in both runs.
    """
    same = n = 0
    for r in rows:
        if r.get("error") or r.get("prediction") is None:
            continue
        base = baseline.get(r["qid"])
        if base is None:
            continue
        n += 1
        same += normalize_answer(r["prediction"]) == normalize_answer(base)
    return (100.0 * same / n if n else float("nan")), n
