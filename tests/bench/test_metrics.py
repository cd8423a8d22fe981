"""vtc.bench.metrics: VQA accuracy, exact match, POPE yes/no F1 and agreement, against hand-computed values."""

import math

import pytest

from vtc.bench.metrics import agreement, get_metric, list_metrics, vqa_accuracy
from vtc.errors import ConfigError


@pytest.mark.parametrize("matches, expected", [
    # m of 10 humans said the prediction. Leaving out a matching human leaves m-1 matches,
    # leaving out another leaves m; each subset scores min(matches/3, 1); average over 10.
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),          # 0.3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),    # 0.6
    (3, (3 * (2 / 3) + 7 * 1.0) / 10),        # 0.9
    (4, 1.0),
    (10, 1.0),
])
def test_vqa_accuracy_ten_answers(matches, expected):
    answers = ["two"] * matches + ["three"] * (10 - matches)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)


def test_vqa_accuracy_values_by_hand():
    assert vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("no", ["yes"] * 2 + ["no"] * 8) == pytest.approx(1.0)
    # normalisation applies to both sides: "A Dog." matches "dog"
    assert vqa_accuracy("A Dog.", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    # a single reference answer is exact match
    assert vqa_accuracy("Dog", ["dog"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    # three answers: leaving one out leaves two; one match -> (0 + 1/3 + 1/3) / 3
    assert vqa_accuracy("red", ["red", "blue", "green"]) == pytest.approx((0 + 1 / 3 + 1 / 3) / 3)
    with pytest.raises(ConfigError):
        vqa_accuracy("x", [])


def test_exact_match():
    m = get_metric("exact")
    assert m.score("Two", ["2"]) == 1.0
    assert m.score("two dogs", ["2"]) == 0.0
    assert m.score("circle", ["square", "Circle."]) == 1.0
    s = m.summarize([{"score": 1.0}, {"score": 0.0}, {"score": 1.0}, {"score": None}])
    assert s["score"] == pytest.approx(200 / 3) and s["n"] == 3


def _yn_rows(pairs):
    return [{"prediction": p, "answers": [g], "score": get_metric("yesno").score(p, [g])} for p, g in pairs]


def test_yesno_pope_f1_by_hand():
    # gold yes x4, no x4. predictions: TP=3, FN=1, FP=1, TN=2, one unreadable answer on a "no" question
    pairs = [("Yes", "yes"), ("yes.", "yes"), ("Yes, it is", "yes"), ("No", "yes"),
             ("yes", "no"), ("no", "no"), ("There is no cat", "no"), ("maybe", "no")]
    rows = _yn_rows(pairs)
    assert [r["score"] for r in rows] == [1, 1, 1, 0, 0, 1, 1, 0]
    s = get_metric("yesno").summarize(rows)
    # the unreadable answer counts as wrong: on a "no" question it is a false positive
    tp, fp, fn, tn = 3, 2, 1, 2
    assert s["precision"] == pytest.approx(100 * tp / (tp + fp))
    assert s["recall"] == pytest.approx(100 * tp / (tp + fn))
    assert s["f1"] == pytest.approx(100 * 2 * tp / (2 * tp + fp + fn)) == s["score"]
    assert s["accuracy"] == pytest.approx(100 * (tp + tn) / 8)
    assert s["yes_ratio"] == pytest.approx(100 * 5 / 8)
    assert s["unreadable"] == 1


def test_yesno_rejects_non_yes_no_gold():
    with pytest.raises(ConfigError, match="yes or all say no"):
        get_metric("yesno").score("yes", ["blue"])


def test_agreement():
    base = {"q1": "Two", "q2": "red", "q3": "cat"}
    rows = [{"qid": "q1", "prediction": "2"}, {"qid": "q2", "prediction": "blue"},
            {"qid": "q3", "prediction": None, "error": "unreadable image"}, {"qid": "q4", "prediction": "x"}]
    pct, n = agreement(rows, base)
    assert (pct, n) == (50.0, 2)
    pct, n = agreement([], base)
    assert math.isnan(pct) and n == 0


def test_registry():
    assert {"vqa", "exact", "yesno"} <= set(list_metrics())
    with pytest.raises(ConfigError, match="unknown metric"):
        get_metric("bleu")
