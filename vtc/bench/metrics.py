"""Benchmark metrics, each equal to a named reference scorer, and agreement between runs.

A metric scores one prediction against a question's reference answers (:meth:`Metric.score`, a
float in [0, 1] written into the question's row) and summarises a cell's rows
(:meth:`Metric.summarize`, a dict whose ``"score"`` is the cell's headline number). For the
intervals and paired tests of :mod:`vtc.bench.stats` a metric also says what it resamples
(:meth:`Metric.units`: one row of sufficient statistics per question, image or question group)
and how its headline follows from their column sums (:meth:`Metric.headline`).

Every metric below was written from its reference's published rules (the references' code was
read, not copied); ``tests/bench/test_metrics.py`` checks each case by case on adversarial
predictions, with the expected values worked out from the reference's rule.

| metric | benchmark | reference it reproduces |
|---|---|---|
| ``vqa`` | VQAv2 | the EvalAI VQA challenge server = lmms-eval <= 0.2.4 ``vqav2``: the EvalAI answer processor on the prediction; ground truth stripped, and when the ten answers are not all the same, ground truth and prediction both go through the official ``processPunctuation`` + ``processDigitArticle``; accuracy = mean over the 10 leave-one-out subsets of min(#matching humans / 3, 1) |
| ``textvqa`` | TextVQA | lmms-eval ``textvqa``: the EvalAI processor on prediction and every ground-truth answer, then the same leave-one-out accuracy |
| ``vizwiz`` | VizWiz-VQA | lmms-eval ``vizwiz_vqa`` (the ``textvqa`` rule); submission rows name the image |
| ``exact`` | GQA | lmms-eval ``gqa``: HF ``evaluate``'s exact match with ``ignore_case`` and ``ignore_punctuation`` (lower-case, delete ``string.punctuation``) of the stripped prediction against any answer |
| ``pope`` | POPE | the official POPE evaluation: the text before the first ``.``, commas deleted, split on spaces; "no" when a word is ``No``, ``no`` or ``not``, else "yes"; accuracy, precision, recall, F1 ("yes" positive), yes-ratio; headline F1 over the cell's questions |
| ``mme`` | MME | lmms-eval ``mme`` (Otter's reading): lower-case, strip, delete ``.``; ``yes`` / ``no``, ``y`` / ``n``, else the first four characters containing ``yes`` (then ``no``), else "other"; per subtask acc + acc+ (both questions of an image right), in percent; headline the perception total (10 subtasks, max 2000), cognition total beside it |
| ``mc`` | ScienceQA-IMG | LLaVA's ``eval_science_qa.py`` (LLaVA-1.5): the letter when the answer is exactly ``A``-``E``, or starts ``"X. "``, or contains exactly one ``The answer is X`` + any character; else FAILED (wrong) |
| ``mmbench`` | MMBench | CircularEval as lmms-eval's ``mmbench`` (VLMEvalKit's rules) prefetches answers, without a GPT judge: ``can_infer_option`` (one option letter as a word, or as ``X.``, ``(X)``, ``X)``, ``:X`` ...), else ``can_infer_text`` (exactly one option's text inside the answer); a question counts only when every circular pass is right; an answer neither rule reads is wrong |
| ``seed`` | SEED-Bench | lmms-eval ``seedbench``: the first character of the stripped prediction equals the answer letter (case-insensitive) |
| ``mmstar`` | MMStar | MMStar's own rule (lmms-eval <= 0.2.4 ``mmstar``): lower-case, strip; right when the first character, or the one after ``(``, ``option `` or ``the answer is ``, is the answer |
| ``ocrbench`` | OCRBench | OCRBench's official rule: some answer, lower-cased and stripped, occurs in the prediction (HME100k: both with spaces and newlines removed, case kept); extra ``final_score`` = the count, OCRBench's score out of 1000 on the full set (lmms-eval 0.7 also folds full-width ASCII first) |

``yesno`` is the former name of ``pope``. :func:`register_metric` adds a metric (a plugin module
named in a config's ``plugins:`` imports and registers it); a subclass needs only ``score``:
the default summary is the mean row score in percent, resampled per question.

:func:`agreement` compares a compressed run's predictions with the uncompressed model's on the
same questions (equal after the EvalAI answer processor, in percent).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from vtc.bench.normalize import evalai_answer, vqa_answer
from vtc.errors import ConfigError

__all__ = ["Metric", "UnitTable", "get_metric", "register_metric", "list_metrics", "agreement", "vqa_accuracy",
           "vqav2_accuracy", "textvqa_accuracy", "gqa_exact_match", "pope_answer", "mme_answer", "llava_option",
           "mmbench_option", "mmstar_correct", "ocrbench_correct", "seed_correct", "scored", "question_fields"]


class UnitTable:
    """Per-unit sufficient statistics of a cell: ``keys[u]``, ``values[u, k]``, ``strata[u]``.

    A unit is what the bootstrap resamples (a question; an MME image; an MMBench question with
    its circular passes). Strata are resampled separately (MME: one per subtask).
    """

    def __init__(self, keys: Sequence[str], values: np.ndarray, strata: np.ndarray | None = None) -> None:
        self.keys = list(keys)
        values = np.asarray(values, dtype=np.float64)
        self.values = values.reshape(len(self.keys), -1) if len(self.keys) else values.reshape(0, values.shape[-1] if values.ndim > 1 else 0)
        self.strata = np.zeros(len(self.keys), dtype=np.int64) if strata is None else np.asarray(strata, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, keys: Sequence[str]) -> UnitTable:
        pos = {k: i for i, k in enumerate(self.keys)}
        idx = [pos[k] for k in keys]
        return UnitTable(list(keys), self.values[idx], self.strata[idx])


def scored(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows that carry a score (error rows and questions without answers excluded)."""
    return [r for r in rows if not r.get("error") and r.get("score") is not None]


class Metric:
    """A metric (see the module docstring). Subclasses set ``name`` via :func:`register_metric`."""

    name: ClassVar[str] = "metric"
    #: the scorer whose numbers this metric reproduces (shown in reports)
    reference: ClassVar[str] = ""
    #: what the headline ``score`` is (shown in reports)
    headline_label: ClassVar[str] = "accuracy in percent"
    #: "mcnemar" when each unit scores 0 or 1 and the headline is their mean; else "bootstrap"
    paired_test: ClassVar[str] = "bootstrap"
    #: question fields (from the task file) the metric reads; the runner copies them into each row's ``meta``
    meta_keys: ClassVar[tuple[str, ...]] = ()

    def score(self, prediction: str, answers: Sequence[str]) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def score_question(self, prediction: str, answers: Sequence[str], meta: Mapping[str, Any]) -> float:
        """The row's score; metrics that need more of the question than its answers override this."""
        return self.score(prediction, answers)

    # ---------------------------------------------------------------- per cell
    def units(self, rows: Iterable[Mapping[str, Any]]) -> UnitTable:
        """One unit per scored question: ``[score, 1]``."""
        ok = scored(rows)
        return UnitTable([str(r["qid"]) for r in ok], np.array([[float(r["score"]), 1.0] for r in ok]).reshape(-1, 2))

    def headline(self, sums: np.ndarray) -> np.ndarray:
        """The headline from the column sums of :meth:`units` (``[..., K]`` -> ``[...]``): mean x 100."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return 100.0 * sums[..., 0] / sums[..., 1]

    def summarize(self, rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """``{"score": headline, "n": units scored, ...}``; rows without a score are skipped."""
        table = self.units(rows)
        score = float(self.headline(table.values.sum(0))) if len(table) else float("nan")
        return {"score": score, "n": len(table)}

    def submission(self, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
        """Records for the benchmark's evaluation server (questions without public answers), or None."""
        return None


_METRICS: dict[str, type[Metric]] = {}
_ALIASES = {"yesno": "pope"}


def register_metric(name: str):
    """Class decorator registering a :class:`Metric` subclass under ``name``.

    A plugin module does ``@register_metric("mine") class Mine(Metric): def score(self, prediction,
    answers): ...``; a task manifest then says ``metric: mine``.
    """

    def deco(cls: type[Metric]) -> type[Metric]:
        cls.name = name
        _METRICS[name] = cls
        return cls

    return deco


def get_metric(name: str) -> Metric:
    """An instance of the metric registered as ``name``."""
    try:
        return _METRICS[_ALIASES.get(name, name)]()
    except KeyError:
        raise ConfigError(f"unknown metric {name!r}; available: {', '.join(sorted(_METRICS))} "
                          "(a plugin module can add one with vtc.bench.metrics.register_metric)") from None


def list_metrics() -> list[str]:
    return sorted(_METRICS)


def _first(answers: Sequence[str], metric: str) -> str:
    if not answers:
        raise ConfigError(f"the {metric} metric needs a reference answer; this question has none")
    return str(answers[0])


# ============================================================================ VQA accuracy
def _leave_one_out(pred: str, gts: Sequence[str]) -> float:
    same = [g == pred for g in gts]
    total = sum(same)
    return sum(min(1.0, (total - s) / 3.0) for s in same) / len(gts)


def _need_humans(answers: Sequence[str], metric: str) -> None:
    if len(answers) < 2:
        raise ConfigError(f"the {metric} metric scores against the human answers (VQAv2, TextVQA, VizWiz: 10); this "
                          f"question has {len(answers)}. With one reference answer use metric: exact")


def vqav2_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy as the EvalAI server computes it (see the module docstring)."""
    _need_humans(answers, "vqa")
    pred = evalai_answer(prediction)
    gts = [str(a).replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
        gts = [vqa_answer(g) for g in gts]
        pred = vqa_answer(pred)
    return _leave_one_out(pred, gts)


#: the former name of :func:`vqav2_accuracy`
vqa_accuracy = vqav2_accuracy


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA / VizWiz accuracy as lmms-eval computes it (see the module docstring)."""
    _need_humans(answers, "textvqa")
    return _leave_one_out(evalai_answer(prediction), [evalai_answer(str(a)) for a in answers])


def _qid(qid: Any) -> Any:
    s = str(qid)
    return int(s) if s.isdigit() else s


@register_metric("vqa")
class VQAv2Accuracy(Metric):
    reference = "VQAv2: EvalAI server / lmms-eval<=0.2.4 vqav2 (EvalAI processor, 10-choose-9 accuracy)"
    headline_label = "VQA accuracy in percent"

    def score(self, prediction: str, answers: Sequence[str]) -> float:
        return vqav2_accuracy(prediction, answers)

    def submission(self, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [{"question_id": _qid(r["qid"]), "answer": evalai_answer(r.get("prediction") or "")}
                for r in rows if not r.get("error")]


@register_metric("textvqa")
class TextVQAAccuracy(VQAv2Accuracy):
    reference = "TextVQA: lmms-eval textvqa (EvalAI processor on both sides, 10-choose-9 accuracy)"

    def score(self, prediction: str, answers: Sequence[str]) -> float:
        return textvqa_accuracy(prediction, answers)


@register_metric("vizwiz")
class VizWizAccuracy(TextVQAAccuracy):
    reference = "VizWiz-VQA: lmms-eval vizwiz_vqa (the textvqa rule)"
    meta_keys = ("image_name",)

    def submission(self, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [{"image": (r.get("meta") or {}).get("image_name") or f"{r['qid']}.jpg",
                 "answer": evalai_answer(r.get("prediction") or "")} for r in rows if not r.get("error")]


# ============================================================================ exact match (GQA)
_NO_PUNCT = str.maketrans("", "", string.punctuation)


def _em_form(text: str) -> str:
    return str(text).lower().translate(_NO_PUNCT)


def gqa_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """lmms-eval's GQA exact match (ignore case, ignore punctuation) against any answer."""
    pred = _em_form(prediction.strip())
    return float(any(pred == _em_form(a) for a in answers))


@register_metric("exact")
class ExactMatch(Metric):
    reference = "GQA: lmms-eval gqa exact_match (ignore_case, ignore_punctuation)"
    paired_test = "mcnemar"

    def score(self, prediction: str, answers: Sequence[str]) -> float:
        return gqa_exact_match(prediction, answers)


# ============================================================================ POPE
def pope_answer(text: str) -> str:
    """``"yes"`` / ``"no"`` as the official POPE evaluation reads a free-form answer."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def _gold_yes_no(answers: Sequence[str], metric: str) -> str:
    gold = _first(answers, metric).strip().lower()
    if gold.endswith("."):  # MME's files write "Yes." in places; the reference deletes periods
        gold = gold.replace(".", "")
    if gold not in ("yes", "no"):
        raise ConfigError(f"the {metric} metric needs the reference answer yes or no, got {list(answers)!r}")
    return gold


@register_metric("pope")
class POPE(Metric):
    reference = "POPE: the official evaluate.py (first sentence; no/not/No -> no); F1, accuracy, precision, recall, yes-ratio"
    headline_label = "F1 in percent, 'yes' positive"

    def score(self, prediction: str, answers: Sequence[str]) -> float:
        return float(pope_answer(prediction) == _gold_yes_no(answers, "pope"))

    def units(self, rows: Iterable[Mapping[str, Any]]) -> UnitTable:
        keys, vals = [], []
        for r in scored(rows):
            pred, gold = pope_answer(r["prediction"] or ""), _gold_yes_no(r["answers"], "pope")
            keys.append(str(r["qid"]))  # one-hot [TP, FP, FN, TN]
            vals.append([pred == "yes" and gold == "yes", pred == "yes" and gold == "no",
                         pred == "no" and gold == "yes", pred == "no" and gold == "no"])
        return UnitTable(keys, np.array(vals, dtype=np.float64).reshape(-1, 4))

    def headline(self, sums: np.ndarray) -> np.ndarray:
        tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
        with np.errstate(invalid="ignore", divide="ignore"):
            return 100.0 * 2 * tp / (2 * tp + fp + fn)

    def summarize(self, rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        table = self.units(rows)
        tp, fp, fn, tn = (float(v) for v in table.values.sum(0)) if len(table) else (0.0, 0.0, 0.0, 0.0)
        n = tp + fp + fn + tn
        nan = float("nan")
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tp / (tp + fp) if tp + fp else nan
            recall = tp / (tp + fn) if tp + fn else nan
        f1 = float(self.headline(np.array([tp, fp, fn, tn]))) if tp + fp + fn else nan
        return {"score": f1, "f1": f1, "accuracy": 100.0 * (tp + tn) / n if n else nan,
                "precision": 100.0 * precision, "recall": 100.0 * recall,
                "yes_ratio": 100.0 * (tp + fp) / n if n else nan, "n": int(n)}


# ============================================================================ MME
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_answer(text: str) -> str:
    """``"yes"`` / ``"no"`` / ``"other"`` as lmms-eval's MME task reads an answer."""
    t = text.lower().strip().replace(".", "")
    if t in ("yes", "no"):
        return t
    if len(t) == 1:
        return {"y": "yes", "n": "no"}.get(t, "other")
    head = t[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _mme_image(row: Mapping[str, Any]) -> str:
    group = row.get("group")
    if group is not None:
        return str(group)
    qid = str(row["qid"])  # vtc convert mme writes "<subtask>/<image>/<i>"
    return qid.rsplit("/", 1)[0] if "/" in qid else qid


_MME_SUBTASKS = MME_PERCEPTION + MME_COGNITION


@register_metric("mme")
class MME(Metric):
    reference = "MME: lmms-eval mme (acc + acc+ per subtask; perception and cognition totals)"
    headline_label = "perception total, acc + acc+ summed over subtasks (max 2000; cognition total without perception)"

    def score(self, prediction: str, answers: Sequence[str]) -> float:
        return float(mme_answer(prediction) == _gold_yes_no(answers, "mme"))

    def units(self, rows: Iterable[Mapping[str, Any]]) -> UnitTable:
        """One unit per image: ``[image acc, 1, image acc+]`` in its subtask's three columns; strata = subtasks."""
        images: dict[tuple[str, str], list[float]] = {}
        for r in scored(rows):
            sub = str(r.get("qtype") or "")
            if sub not in _MME_SUBTASKS:
                raise ConfigError(f"MME question {r['qid']!r} has subtask (question_type) {sub!r}; MME's subtasks are "
                                  f"{', '.join(_MME_SUBTASKS)} (vtc convert mme names them after the release's folders)")
            images.setdefault((sub, _mme_image(r)), []).append(float(r["score"]))
        vals = np.zeros((len(images), 3 * len(_MME_SUBTASKS)))
        strata = []
        for u, ((sub, _), scores) in enumerate(images.items()):
            c = 3 * _MME_SUBTASKS.index(sub)
            vals[u, c:c + 3] = (sum(scores) / len(scores), 1.0, float(all(s == 1.0 for s in scores)))
            strata.append(_MME_SUBTASKS.index(sub))
        return UnitTable([f"{s}/{i}" for s, i in images], vals, np.array(strata, dtype=np.int64))

    @staticmethod
    def _per_subtask(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(score [..., 14], present [..., 14])``: acc + acc+ in percent per subtask, and which subtasks have images."""
        s = sums.reshape(*sums.shape[:-1], len(_MME_SUBTASKS), 3)
        n = s[..., 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(n > 0, 100.0 * (s[..., 0] + s[..., 2]) / np.where(n > 0, n, 1), 0.0)
        return score, n > 0

    def headline(self, sums: np.ndarray) -> np.ndarray:
        """The perception total; the cognition total when no perception subtask was run."""
        score, present = self._per_subtask(sums)
        k = len(MME_PERCEPTION)
        perception = score[..., :k].sum(-1)
        has_perception = present[..., :k].any(-1)
        out = np.where(has_perception, perception, score[..., k:].sum(-1))
        return np.where(present.any(-1), out, np.nan)

    def summarize(self, rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        table = self.units(rows)
        out: dict[str, Any] = {"score": float("nan"), "n": len(table)}
        if not len(table):
            return out
        sums = table.values.sum(0)
        score, present = self._per_subtask(sums)
        k = len(MME_PERCEPTION)
        out["score"] = float(self.headline(sums))
        out["perception"] = float(score[:k].sum()) if present[:k].any() else float("nan")
        out["cognition"] = float(score[k:].sum()) if present[k:].any() else float("nan")
        out.update({f"subtask[{s}]": float(score[i]) for i, s in enumerate(_MME_SUBTASKS) if present[i]})
        return out


# ============================================================================ multiple choice
_LLAVA_OPTIONS = ("A", "B", "C", "D", "E")
_LLAVA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def llava_option(prediction: str) -> str | None:
    """The option letter LLaVA's ScienceQA evaluation reads from an answer, or None (FAILED)."""
    pred = prediction.strip()
    if pred in _LLAVA_OPTIONS:
        return pred
    if len(pred) >= 3 and pred[0] in _LLAVA_OPTIONS and pred[1:3] == ". ":
        return pred[0]
    found = _LLAVA_ANSWER_IS.findall(pred)
    return found[0] if len(found) == 1 else None


def _gold_letter(answers: Sequence[str], metric: str) -> str:
    gold = _first(answers, metric).strip()
    if len(gold) != 1 or not gold.isupper():
        raise ConfigError(f"the {metric} metric needs the answer's option letter (A, B, ...), got {list(answers)!r}")
    return gold


@register_metric("mc")
class MultipleChoice(Metric):
    reference = "ScienceQA-IMG: LLaVA-1.5 eval_science_qa.py option extraction"
    paired_test = "mcnemar"

    def score(self, prediction: str, answers: Sequence[str]) -> float:
        return float(llava_option(prediction) == _gold_letter(answers, "mc"))


def mmbench_option(prediction: str, choices: Mapping[str, str] | None = None) -> str | None:
    """The option MMBench's answer prefetch (``can_infer``) reads, or None."""
    letters = "ABCDE"
    words = [w.strip() for w in prediction.split()]

    def count(prefix: str = "", suffix: str = "") -> list[str]:
        return [c for c in letters if prefix + c + suffix in words]

    bare = count()
    if len(bare) == 1 and not ("A" in words and len(words) > 3):  # a lone "A" in a sentence may be the article
        return bare[0]
    for prefix, suffix in (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                           (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")):
        found = count(prefix, suffix)
        if len(found) == 1:
            return found[0]
    if choices:
        low = prediction.lower()
        inside = [k for k, v in choices.items() if str(v).lower() in low]
        if len(inside) == 1:
            return inside[0]
    return None


@register_metric("mmbench")
class MMBenchCircular(Metric):
    reference = "MMBench: CircularEval with VLMEvalKit's answer prefetch (lmms-eval mmbench, no GPT judge)"
    headline_label = "CircularEval accuracy in percent (every pass right)"
    paired_test = "mcnemar"
    meta_keys = ("choices", "pass")

    def score(self, prediction: str, answers: Sequence[str]) -> float:
        return self.score_question(prediction, answers, {})

    def score_question(self, prediction: str, answers: Sequence[str], meta: Mapping[str, Any]) -> float:
        return float(mmbench_option(prediction, meta.get("choices")) == _gold_letter(answers, "mmbench"))

    def units(self, rows: Iterable[Mapping[str, Any]]) -> UnitTable:
        groups: dict[str, list[float]] = {}
        for r in scored(rows):
            key = str(r["group"]) if r.get("group") is not None else str(r["qid"])
            groups.setdefault(key, []).append(float(r["score"]))
        return UnitTable(list(groups), np.array([[float(all(s == 1.0 for s in v)), 1.0] for v in groups.values()]).reshape(-1, 2))

    def summarize(self, rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        rows = list(rows)
        out = super().summarize(rows)
        first = [r for r in scored(rows) if int((r.get("meta") or {}).get("pass", 0)) == 0]
        out["single_pass"] = 100.0 * sum(float(r["score"]) for r in first) / len(first) if first else float("nan")
        return out


def seed_correct(prediction: str, answer: str) -> bool:
    """lmms-eval's SEED-Bench rule: the first character of the stripped prediction is the answer."""
    pred = prediction.strip()
    return pred[:1].lower().strip() == str(answer).lower().strip()


@register_metric("seed")
class SEEDBench(Metric):
    reference = "SEED-Bench: lmms-eval seedbench (first character of the answer)"
    paired_test = "mcnemar"

    def score(self, prediction: str, answers: Sequence[str]) -> float:
        return float(seed_correct(prediction, _first(answers, "seed")))


def mmstar_correct(prediction: str, answer: str) -> bool:
    """MMStar's rule (see the module docstring)."""
    gold = str(answer).lower().strip().replace("\n", " ")
    pred = prediction.lower().strip().replace("\n", " ")
    try:
        return (gold == pred[0] or (pred[0] == "(" and gold == pred[1]) or (pred[:7] == "option " and gold == pred[7])
                or (pred[:14] == "the answer is " and gold == pred[14]))
    except IndexError:  # the reference scores an answer too short to read as wrong
        return False


@register_metric("mmstar")
class MMStar(Metric):
    reference = "MMStar: MMStar's own letter rule (lmms-eval<=0.2.4 mmstar)"
    paired_test = "mcnemar"

    def score(self, prediction: str, answers: Sequence[str]) -> float:
        return float(mmstar_correct(prediction, _first(answers, "mmstar")))


def ocrbench_correct(prediction: str, answers: Sequence[str], dataset: str | None = None) -> bool:
    """OCRBench's rule (see the module docstring)."""
    if dataset == "HME100k":
        def form(s: str) -> str:
            return s.strip().replace("\n", " ").replace(" ", "")
    else:
        def form(s: str) -> str:
            return s.lower().strip().replace("\n", " ")
    pred = form(prediction.strip())
    return any(form(str(a)) in pred for a in answers)


@register_metric("ocrbench")
class OCRBench(Metric):
    reference = "OCRBench: the official rule (answer contained in the prediction; HME100k without spaces)"
    paired_test = "mcnemar"
    meta_keys = ("dataset",)

    def score(self, prediction: str, answers: Sequence[str]) -> float:
        return self.score_question(prediction, answers, {})

    def score_question(self, prediction: str, answers: Sequence[str], meta: Mapping[str, Any]) -> float:
        if not answers:
            raise ConfigError("the ocrbench metric needs reference answers; this question has none")
        return float(ocrbench_correct(prediction, answers, meta.get("dataset")))

    def summarize(self, rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        rows = list(rows)
        out = super().summarize(rows)
        out["final_score"] = sum(float(r["score"]) for r in scored(rows))
        return out


def question_fields(question: Any, metric: str) -> dict[str, Any]:
    """What a row keeps of its question for scoring: ``group`` (the resampling unit shared by an MME
    image's questions or MMBench's circular passes) and ``meta`` (the fields ``metric`` reads)."""
    meta = getattr(question, "meta", None) or {}
    out: dict[str, Any] = {}
    if meta.get("group") is not None:
        out["group"] = str(meta["group"])
    try:
        keys = get_metric(metric).meta_keys
    except ConfigError:
        keys = ()
    picked = {k: meta[k] for k in keys if k in meta}
    if picked:
        out["meta"] = picked
    return out


def agreement(rows: Iterable[Mapping[str, Any]], baseline: Mapping[str, str]) -> tuple[float, int]:
    """Percent of ``rows`` whose answer equals the uncompressed model's after the EvalAI processor.

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
        same += evalai_answer(r["prediction"]) == evalai_answer(base)
    return (100.0 * same / n if n else float("nan")), n
