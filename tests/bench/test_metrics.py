"""vtc.bench.metrics against each reference scorer's published rule, case by case.

Each expected value is derived by hand from the reference's rule (written next to the case), on
predictions chosen to hit its corners: punctuation, case, number words and digits, articles,
contractions, empty output, option formats. Where the reference has a quirk, the case says so.
"""

import math

import pytest

from vtc.bench.metrics import (
    agreement,
    get_metric,
    list_metrics,
    llava_option,
    mmbench_option,
    mme_answer,
    mmstar_correct,
    ocrbench_correct,
    pope_answer,
    seed_correct,
    textvqa_accuracy,
    vqav2_accuracy,
)
from vtc.errors import ConfigError


def ten(*parts):
    """Ten human answers from (answer, count) pairs."""
    out = [a for a, n in parts for _ in range(n)]
    assert len(out) == 10
    return out


# ---------------------------------------------------------------- VQAv2 (EvalAI server)
@pytest.mark.parametrize("pred, answers, expected", [
    # unanimous ground truth is compared raw: only the prediction is processed
    ("Two", ten(("2", 10)), 1.0),
    ("2", ten(("two", 10)), 0.0),                 # quirk: unanimous "two" is not normalised
    ("Yes", ten(("Yes", 10)), 0.0),               # quirk: nor lower-cased (VQAv2's answers already are)
    ("2", ten(("two", 9), ("2", 1)), 1.0),        # disagreement: both sides processed, 10 matches
    ("50%", ten(("50", 10)), 0.0),                # "%" is not in the punctuation list
    ("$5", ten(("5", 10)), 0.0),
    (".5", ten(("5", 10)), 0.0),                  # a period before a digit stays
    ("a.m.", ten(("am", 10)), 1.0),               # periods deleted, "am" kept
    ("1,000", ten(("1000", 10)), 1.0),            # the tokeniser deletes commas
    ("ten", ten(("10", 10)), 1.0),
    ("dont know", ten(("don't know", 10)), 1.0),  # contraction restored
    ("what's that", ten(("whats that", 5), ("x", 5)), 0.0),  # "what 's that" vs "what's that"
    ("t-shirt", ten(("t shirt", 4), ("shirt", 6)), 1.0),      # 4 matches: every subset has >= 3
    ("Yes.", ten(("yes", 3), ("no", 7)), 0.9),    # (3 x 2/3 + 7 x 1) / 10
    ("The dog", ten(("dog", 2), ("cat", 8)), 0.6),  # (2 x 1/3 + 8 x 2/3) / 10
    ("dog", ten(("dog", 1), ("cat", 9)), 0.3),    # (1 x 0 + 9 x 1/3) / 10
    ("", ten(("yes", 10)), 0.0),
])
def test_vqa(pred, answers, expected):
    assert vqav2_accuracy(pred, answers) == pytest.approx(expected)
    assert get_metric("vqa").score(pred, answers) == pytest.approx(expected)


def test_vqa_needs_the_human_answers():
    for name in ("vqa", "textvqa"):
        with pytest.raises(ConfigError, match="human answers"):
            get_metric(name).score("dog", ["dog"])


# ---------------------------------------------------------------- TextVQA / VizWiz (lmms-eval)
@pytest.mark.parametrize("pred, answers, expected", [
    ("Yes", ten(("Yes", 10)), 1.0),               # both sides processed, unlike VQAv2
    ("2", ten(("two", 10)), 1.0),
    ("Nike.", ten(("nike", 3), ("adidas", 7)), 0.9),
    ("coca-cola", ten(("Coca Cola", 10)), 1.0),
    ("what's", ten(("whats", 10)), 0.0),          # "what 's" vs "what's"
    ("STOP", ten(("stop", 1), ("stop sign", 9)), 0.3),
])
def test_textvqa(pred, answers, expected):
    assert textvqa_accuracy(pred, answers) == pytest.approx(expected)
    assert get_metric("vizwiz").score(pred, answers) == pytest.approx(expected)


# ---------------------------------------------------------------- GQA exact match (lmms-eval)
@pytest.mark.parametrize("pred, answers, expected", [
    ("Yes", ["yes"], 1.0), ("yes.", ["yes"], 1.0), ("  table ", ["table"], 1.0),
    ("T-Shirt", ["t-shirt"], 1.0), ("t-shirt", ["t shirt"], 0.0),   # punctuation deleted, not spaced
    ("two", ["2"], 0.0), ("the table", ["table"], 0.0),           # no number words, no articles
    ("don't", ["dont"], 1.0), ("50%", ["50"], 1.0), ("", ["no"], 0.0),
    ("circle", ["square", "Circle."], 1.0),                        # any reference answer
])
def test_exact(pred, answers, expected):
    assert get_metric("exact").score(pred, answers) == expected


# ---------------------------------------------------------------- POPE (official evaluate.py)
@pytest.mark.parametrize("pred, expected", [
    ("Yes", "yes"), ("No", "no"), ("no.", "no"), ("No, there is not.", "no"),
    ("Yes, there is no dog.", "no"),   # quirk: any "no" word in the first sentence
    ("There is a dog. No cat.", "yes"),  # only the first sentence counts
    ("NO", "yes"), ("Nope", "yes"), ("", "yes"),   # quirk: only No / no / not say no
    ("not sure", "no"), ("I cannot tell", "yes"), ("Yes. No.", "yes"), ("no,", "no"),
])
def test_pope_reading(pred, expected):
    assert pope_answer(pred) == expected


def test_pope_summary_by_hand():
    pairs = [("Yes", "yes"), ("yes.", "yes"), ("Yes, it is", "yes"), ("No", "yes"),
             ("yes", "no"), ("no", "no"), ("There is no cat", "no"), ("maybe", "no")]
    m = get_metric("pope")
    rows = [{"qid": f"q{i}", "prediction": p, "answers": [g], "score": m.score(p, [g])} for i, (p, g) in enumerate(pairs)]
    assert [r["score"] for r in rows] == [1, 1, 1, 0, 0, 1, 1, 0]
    s = m.summarize(rows)
    tp, fp, fn, tn = 3, 2, 1, 2   # "maybe" reads as yes: a false positive
    assert s["precision"] == pytest.approx(100 * tp / (tp + fp))
    assert s["recall"] == pytest.approx(100 * tp / (tp + fn))
    p, r = tp / (tp + fp), tp / (tp + fn)
    assert s["f1"] == pytest.approx(100 * 2 * p * r / (p + r)) == s["score"]
    assert s["accuracy"] == pytest.approx(100 * (tp + tn) / 8)
    assert s["yes_ratio"] == pytest.approx(100 * 5 / 8)
    assert get_metric("yesno").name == "pope"   # the former name
    with pytest.raises(ConfigError, match="yes or no"):
        m.score("yes", ["blue"])


# ---------------------------------------------------------------- MME (lmms-eval)
@pytest.mark.parametrize("pred, expected", [
    ("Yes", "yes"), ("yes.", "yes"), (" yes ", "yes"), ("No, it is not.", "no"), ("y", "yes"), ("N", "no"),
    ("y.", "yes"), ("x", "other"), ("", "other"), ("Nothing", "no"),   # "noth" holds "no"
    ("The answer is yes", "other"),   # only the first four characters count
    ("Yes, no", "yes"), ("not sure", "no"),
])
def test_mme_reading(pred, expected):
    assert mme_answer(pred) == expected


def test_mme_scores_by_hand():
    m = get_metric("mme")
    spec = [("existence", "img1", ["yes", "no"], ["Yes", "No"]),     # both right
            ("existence", "img2", ["yes", "no"], ["Yes", "Yes"]),    # one right
            ("count", "img3", ["yes", "no"], ["No", "Yes"]),         # none right
            ("code_reasoning", "img4", ["yes", "no"], ["yes", "no"])]
    rows = []
    for sub, img, golds, preds in spec:
        for j, (g, p) in enumerate(zip(golds, preds)):
            rows.append({"qid": f"{sub}/{img}/{j}", "qtype": sub, "prediction": p, "answers": [g],
                         "score": m.score(p, [g])})
    s = m.summarize(rows)
    # existence: acc = 3/4 = 75, acc+ = 1/2 = 50 -> 125; count: 0; perception = 125; cognition: 100 + 100
    assert s["subtask[existence]"] == pytest.approx(125) and s["subtask[count]"] == 0
    assert s["perception"] == pytest.approx(125) == s["score"] and s["cognition"] == pytest.approx(200)
    with pytest.raises(ConfigError, match="subtask"):
        m.summarize([dict(rows[0], qtype="colour")])


# ---------------------------------------------------------------- ScienceQA (LLaVA-1.5)
@pytest.mark.parametrize("pred, letter", [
    ("A", "A"), ("B. cat", "B"), ("E", "E"), (" C ", "C"),
    ("B.", None), ("B.cat", None), ("(B)", None), ("b", None), ("F", None), ("", None), ("The", None),
    ("The answer is C.", "C"), ("The answer is C, because", "C"),
    ("The answer is C", None),                         # the pattern wants one character after the letter
    ("the answer is C.", None),                        # case-sensitive
    ("The answer is A. The answer is B.", None),       # two matches: FAILED
])
def test_llava_option(pred, letter):
    assert llava_option(pred) == letter


def test_mc_fixes_the_empty_gold_bug():
    m = get_metric("mc")
    assert m.score("", ["A"]) == 0.0 and m.score("The", ["A"]) == 0.0 and m.score("a", ["A"]) == 0.0
    assert m.score("A. The dog", ["A"]) == 1.0 and m.score("The answer is F.", ["A"]) == 0.0
    with pytest.raises(ConfigError, match="option letter"):
        m.score("A", ["the dog"])


# ---------------------------------------------------------------- MMBench (CircularEval)
CHOICES = {"A": "dog", "B": "cat", "C": "red fox", "D": "bird"}


@pytest.mark.parametrize("pred, letter", [
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("C)", "C"), ("Option C: red", "C"), ("The answer is B", "B"),
    ("I choose A", "A"),
    ("A cat sits on the mat", "B"),   # a lone "A" in a long answer may be the article: read by option text
    ("A or B", None), ("a", None), ("", None),
    ("It is a red fox", "C"), ("a dog and a cat", None),   # two option texts inside: unreadable
    ("E", "E"),                        # the prefetch considers A-E
])
def test_mmbench_option(pred, letter):
    assert mmbench_option(pred, CHOICES) == letter


def test_mmbench_circular_by_hand():
    m = get_metric("mmbench")
    rows = []
    # question 1: right in every pass; question 2: wrong in its second pass; question 3: unreadable once
    for g, passes in (("1", [("B", "B"), ("C", "C"), ("D", "D"), ("A", "A")]), ("2", [("A", "A"), ("B", "C")]),
                      ("3", [("C", "C"), ("nothing", "D")])):
        for k, (pred, gold) in enumerate(passes):
            meta = {"choices": CHOICES, "pass": k}
            rows.append({"qid": f"{g}-{k}", "group": g, "meta": meta, "prediction": pred, "answers": [gold],
                         "score": m.score_question(pred, [gold], meta)})
    s = m.summarize(rows)
    assert s["score"] == pytest.approx(100 / 3) and s["n"] == 3
    assert s["single_pass"] == 100.0   # every first pass was right


# ---------------------------------------------------------------- SEED-Bench, MMStar, OCRBench
@pytest.mark.parametrize("pred, gold, ok", [
    ("B", "B", True), ("b", "B", True), ("B. cat", "B", True), (" C", "C", True),
    ("The answer is B", "B", False), ("", "A", False), ("(B)", "B", False),
])
def test_seed(pred, gold, ok):
    assert seed_correct(pred, gold) is ok


@pytest.mark.parametrize("pred, gold, ok", [
    ("B", "B", True), ("(b)", "B", True), ("option b", "B", True), ("The answer is B.", "B", True),
    ("b) cat", "B", True), ("Answer: B", "B", False), ("", "B", False), ("(", "B", False), ("option ", "B", False),
])
def test_mmstar(pred, gold, ok):
    assert mmstar_correct(pred, gold) is ok


@pytest.mark.parametrize("pred, answers, dataset, ok", [
    ("hello world", ["Hello"], "IIIT5K", True), ("HELLO", ["hello"], "IIIT5K", True),
    ("hel lo", ["hello"], "IIIT5K", False), ("", ["a"], "IIIT5K", False), ("x^2", ["X^2"], "IIIT5K", True),
    ("x^2", ["x ^ 2"], "HME100k", True),    # HME: spaces removed on both sides
    ("x^2", ["X^2"], "HME100k", False),     # HME: case kept
    ("the total is 12.50", ["12.5", "12.50"], "FUNSD", True),
])
def test_ocrbench(pred, answers, dataset, ok):
    assert ocrbench_correct(pred, answers, dataset) is ok


def test_ocrbench_final_score():
    m = get_metric("ocrbench")
    rows = [{"qid": str(i), "score": m.score_question(p, a, {"dataset": "IIIT5K"}), "prediction": p, "answers": a}
            for i, (p, a) in enumerate([("cat", ["cat"]), ("dog", ["cat"]), ("a cat", ["cat"])])]
    s = m.summarize(rows)
    assert s["final_score"] == 2 and s["score"] == pytest.approx(200 / 3)


# ---------------------------------------------------------------- registry, submissions, agreement
def test_registry_and_plugin_metric():
    assert {"vqa", "textvqa", "vizwiz", "exact", "pope", "mme", "mc", "mmbench", "seed", "mmstar", "ocrbench"} <= set(
        list_metrics())
    with pytest.raises(ConfigError, match="unknown metric"):
        get_metric("bleu")
    from vtc.bench.metrics import Metric, register_metric

    @register_metric("test-startswith")
    class StartsWith(Metric):   # what a plugin module does: only score()
        def score(self, prediction, answers):
            return float(any(prediction.startswith(a) for a in answers))

    m = get_metric("test-startswith")
    rows = [{"qid": str(i), "score": m.score(p, ["ab"])} for i, p in enumerate(["abc", "x", "ab"])]
    assert m.summarize(rows)["score"] == pytest.approx(200 / 3)


def test_submissions():
    rows = [{"qid": "42", "prediction": "Two dogs.", "answers": []}, {"qid": "q7", "prediction": "a Red", "answers": []}]
    assert get_metric("textvqa").submission(rows) == [{"question_id": 42, "answer": "2 dogs"},
                                                      {"question_id": "q7", "answer": "red"}]
    rows[0]["meta"] = {"image_name": "VizWiz_test_00000042.jpg"}
    assert get_metric("vizwiz").submission(rows[:1]) == [{"image": "VizWiz_test_00000042.jpg", "answer": "2 dogs"}]


def test_agreement():
    base = {"q1": "Two", "q2": "red", "q3": "cat"}
    rows = [{"qid": "q1", "prediction": "2"}, {"qid": "q2", "prediction": "blue"},
            {"qid": "q3", "prediction": None, "error": "unreadable image"}, {"qid": "q4", "prediction": "x"}]
    pct, n = agreement(rows, base)
    assert (pct, n) == (50.0, 2)
    pct, n = agreement([], base)
    assert math.isnan(pct) and n == 0
