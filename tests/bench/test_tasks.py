"""vtc.bench.tasks: manifests and the deterministic (stratified) question selection."""

from collections import Counter

import pytest

from vtc.bench.loaders import Question
from vtc.bench.tasks import load_task, select
from vtc.errors import ConfigError


def test_manifest(jsonl_task):
    task = load_task(jsonl_task)
    assert task.name == "colors" and task.loader == "jsonl" and task.metric == "vqa" and task.max_new_tokens == 2
    assert task.format_prompt("why?") == "why?\nAnswer with a single word."
    qs = task.questions()
    assert len(qs) == 9 and qs[0].qid == "q0"
    assert load_task(jsonl_task).hash == task.hash
    assert load_task(jsonl_task, metric="exact").hash != task.hash


@pytest.mark.parametrize("bad, match", [
    ({"loader": "jsonl", "prompt": "no placeholder"}, "must contain"),
    ({"loader": "jsonl", "metric": "bleu"}, "unknown metric"),
    ({"prompt": "{question}"}, "needs 'loader'"),
    ({"loader": "jsonl", "colour": 1}, "unknown key"),
])
def test_manifest_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_task({"name": "x", **bad})


def _qs():
    # 60 yes/no, 30 color, 10 shape questions, interleaved
    kinds = ["yes/no"] * 60 + ["color"] * 30 + ["shape"] * 10
    order = sorted(range(100), key=lambda i: (i * 37) % 100)
    return [Question(qid=f"q{i}", image=None, question="?", answers=[f"a{i % 7}"], qtype=kinds[j])
            for i, j in enumerate(order)]


def test_select_limit_and_all():
    qs = _qs()
    assert select(qs) == qs
    assert select(qs, limit=1000) == qs
    assert [q.qid for q in select(qs, limit=5)] == ["q0", "q1", "q2", "q3", "q4"]
    with pytest.raises(ConfigError):
        select(qs, limit=5, stratify="colour")


def test_select_stratified_proportions_and_determinism():
    qs = _qs()
    sub = select(qs, limit=20, stratify="qtype", seed=0)
    assert Counter(q.qtype for q in sub) == {"yes/no": 12, "color": 6, "shape": 2}
    # original order kept, no duplicates, deterministic
    pos = {q.qid: i for i, q in enumerate(qs)}
    assert [pos[q.qid] for q in sub] == sorted(pos[q.qid] for q in sub)
    assert len({q.qid for q in sub}) == 20
    assert [q.qid for q in select(qs, limit=20, stratify="qtype", seed=0)] == [q.qid for q in sub]
    assert [q.qid for q in select(qs, limit=20, stratify="qtype", seed=1)] != [q.qid for q in sub]
    # largest remainder: 7 of 100 -> 4.2, 2.1, 0.7 -> 4, 2, 0 + one extra to the largest remainder (shape)
    assert Counter(q.qtype for q in select(qs, limit=7, stratify="qtype")) == {"yes/no": 4, "color": 2, "shape": 1}
    by_answer = select(qs, limit=14, stratify="answer")
    assert len(by_answer) == 14 and len({q.answers[0] for q in by_answer}) == 7
