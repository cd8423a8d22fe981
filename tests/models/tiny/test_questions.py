"""tiny questions: every answer re-derived from the scene spec by an independent parser."""

import random

import pytest

from vtc.models.tiny.datasets import dataset
from vtc.models.tiny.questions import NUMBER_WORDS, QuestionConfig, ask, ask_many
from vtc.models.tiny.scene import COLORS, LARGE_SCENES, SHAPES, SMALL_SCENES, generate_scene

PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross",
          "objects": None, "object": None}


def parse_desc(words):
    d = {}
    for w in words:
        if w in ("small", "large"):
            d["size"] = w
        elif w in COLORS:
            d["color"] = w
        elif w in SHAPES:
            d["shape"] = w
        elif w in PLURAL:
            if PLURAL[w]:
                d["shape"] = PLURAL[w]
        else:
            raise AssertionError(f"unexpected word {w!r}")
    return d


def matching(scene, d):
    return [o for o in scene.objects if all(getattr(o, k) == v for k, v in d.items())]


def brute_answer(scene, q):
    w = q.split()
    assert w[-1] == "?"
    w = w[:-1]
    if w[:2] == ["how", "many"]:
        assert w[-2:] == ["are", "there"]
        return "count", NUMBER_WORDS[len(matching(scene, parse_desc(w[2:-2])))]
    if w[:2] == ["is", "there"]:
        assert w[2] in ("a", "an") and (w[2] == "an") == (w[3][0] in "aeiou")
        return "exist", "yes" if matching(scene, parse_desc(w[3:])) else "no"
    if w[0] == "what":
        assert w[2:4] == ["is", "the"]
        objs = matching(scene, parse_desc(w[4:]))
        assert len(objs) == 1, q
        return "attribute", getattr(objs[0], w[1])
    assert w[:2] == ["is", "the"]
    rel_i = next(i for i, x in enumerate(w) if x in ("left", "right", "above", "below"))
    rel = w[rel_i]
    rest = w[rel_i + 1:]
    if rest[0] == "of":
        rest = rest[1:]
    assert rest[0] == "the"
    a, b = matching(scene, parse_desc(w[2:rel_i])), matching(scene, parse_desc(rest[1:]))
    assert len(a) == 1 and len(b) == 1 and a[0] is not b[0], q
    a, b = a[0], b[0]
    truth = {"left": a.x < b.x, "right": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[rel]
    assert abs(a.x - b.x if rel in ("left", "right") else a.y - b.y) >= 4
    return "spatial", "yes" if truth else "no"


@pytest.mark.parametrize("cfg,qcfg", [(SMALL_SCENES, QuestionConfig()), (LARGE_SCENES, QuestionConfig(small_weight=3))])
def test_answers_follow_from_the_scene(cfg, qcfg):
    rng = random.Random(0)
    seen = set()
    for i in range(150):
        s = generate_scene(f"q/{i}", cfg)
        for qa in ask_many(rng, s, 8, qcfg):
            qtype, ans = brute_answer(s, qa.question)
            assert (qtype, ans) == (qa.qtype, qa.answer), qa
            seen.add(qa.qtype)
    assert seen == {"count", "exist", "attribute", "spatial"}


def test_fixed_splits_answer_consistently_and_cover_types():
    for name in ("shapes", "shapes-large"):
        items = dataset(name).items("val", limit=120)
        for it in items:
            assert brute_answer(it.scene, it.question) == (it.qtype, it.answer)
        assert {it.qtype for it in items} == {"count", "exist", "attribute", "spatial"}


def test_ask_by_type_and_balance():
    rng = random.Random(1)
    yes = total = 0
    counts = set()
    for i in range(300):
        s = generate_scene(f"b/{i}")
        qa = ask(rng, s, qtype="exist")
        yes += qa.answer == "yes"
        total += 1
        c = ask(rng, s, qtype="count")
        counts.add(c.answer)
    assert 0.4 < yes / total < 0.6
    assert {"zero", "one", "two", "three", "four", "five"} <= counts
