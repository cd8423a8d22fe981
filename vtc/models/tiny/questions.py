"""Questions about a procedural scene, with single-word answers from a closed vocabulary.

Four question types, each recorded on the :class:`QA` (``qtype``, and ``detail`` for the variant):

- ``count``: "how many red circles are there ?" (any of: all objects, a shape, a colour, a size, or a
  pair of these) -> a number word ``zero`` .. ``twelve``;
- ``exist``: "is there a small blue square ?" -> ``yes`` / ``no`` (the "no" descriptions differ
  from a drawn object in one attribute, so they cannot be answered from colour statistics alone);
- ``attribute``: "what color is the large triangle ?", "what shape is the red object ?", "what
  size is the blue cross ?" -> a colour, shape or size, asked only when the description names
  exactly one object;
- ``spatial``: "is the red circle left of the small square ?" (left / right / above / below, by
  centres, asked only when the centres differ by at least ``min_offset`` pixels along that axis
  and both descriptions are unique) -> ``yes`` / ``no``.

Objects are described by the fewest attributes that single them out. ``small_weight`` makes
questions about small objects more likely (the ``tiny-llava-next`` scenes, whose small objects
need the AnyRes crops). Answers are balanced: yes/no half each, counts drawn from the objects present.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from vtc.models.tiny.scene import COLORS, SHAPES, SIZES, Scene, SceneObject

__all__ = ["QA", "QuestionConfig", "ask", "ask_many", "QTYPES", "NUMBER_WORDS", "TEMPLATE_WORDS",
           "describe", "matches", "PLURALS"]

QTYPES: tuple[str, ...] = ("count", "exist", "attribute", "spatial")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                                 "ten", "eleven", "twelve")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
                           "object": "objects"}
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
#: every word the templates use besides attribute values and answers
TEMPLATE_WORDS: tuple[str, ...] = ("how", "many", "are", "there", "?", "is", "a", "an", "what", "color", "shape",
                                   "size", "the", "left", "right", "of", "above", "below", "object", "objects")

_ATTRS = ("size", "color", "shape")


@dataclass(frozen=True)
class QA:
    """A question, its single-word answer, its type (:data:`QTYPES`) and a finer ``detail``."""

    question: str
    answer: str
    qtype: str
    detail: str = ""


@dataclass(frozen=True)
class QuestionConfig:
    """Mix of question types (weights in :data:`QTYPES` order), small-object preference, spatial margin."""

    type_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    small_weight: float = 1.0
    min_offset: int = 4


Desc = dict  # attribute name -> value, a subset of {"size", "color", "shape"}


def matches(obj: SceneObject, desc: Desc) -> bool:
    """Whether ``obj`` has every attribute value in ``desc``."""
    return all(getattr(obj, k) == v for k, v in desc.items())


def describe(desc: Desc, plural: bool = False) -> str:
    """``{"size": "small", "color": "red"}`` -> ``"small red object"`` (``"objects"`` if plural)."""
    noun = desc.get("shape", "object")
    words = [desc[k] for k in ("size", "color") if k in desc]
    return " ".join([*words, PLURALS[noun] if plural else noun])


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _unique_desc(obj: SceneObject, objects: Sequence[SceneObject], exclude: str | None = None) -> Desc | None:
    """The shortest description of ``obj`` (not using ``exclude``) that no other object matches."""
    attrs = [a for a in ("shape", "color", "size") if a != exclude]
    for n in range(1, len(attrs) + 1):
        for sub in combinations(attrs, n):
            d = {a: getattr(obj, a) for a in sub}
            if sum(matches(o, d) for o in objects) == 1:
                return d
    return None


def _pick_object(rng: random.Random, objects: Sequence[SceneObject], cfg: QuestionConfig) -> SceneObject:
    weights = [cfg.small_weight if o.size == "small" else 1.0 for o in objects]
    return rng.choices(list(objects), weights=weights)[0]


_COUNT_KINDS = ((), ("shape",), ("color",), ("size",), ("color", "shape"), ("size", "shape"), ("size", "color"))


def _count(rng: random.Random, scene: Scene, cfg: QuestionConfig) -> QA | None:
    objs = scene.objects
    values = {"size": SIZES, "color": tuple(COLORS), "shape": SHAPES}
    # every description of a drawn object, plus one absent one; then a count drawn uniformly among
    # those the scene offers, so answers are not dominated by "one"
    cands: dict[int, list[Desc]] = {}
    seen: set[tuple] = set()
    for kind in _COUNT_KINDS:
        for o in objs:
            d = {a: getattr(o, a) for a in kind}
            key = tuple(sorted(d.items()))
            if key not in seen:
                seen.add(key)
                cands.setdefault(sum(matches(x, d) for x in objs), []).append(d)
    kind = rng.choice(_COUNT_KINDS[1:])
    absent = {a: rng.choice(values[a]) for a in kind}
    if not any(matches(o, absent) for o in objs):
        cands.setdefault(0, []).append(absent)
    counts = [n for n in sorted(cands) if n < len(NUMBER_WORDS)]
    if not counts:
        return None
    weights = [cfg.small_weight if any(d.get("size") == "small" for d in cands[n]) else 1.0 for n in counts]
    n = rng.choices(counts, weights=weights)[0]
    ds = cands[n]
    d = rng.choice([x for x in ds if x.get("size") == "small"] or ds) if rng.random() < 1 - 1 / cfg.small_weight \
        else rng.choice(ds)
    kind_name = "+".join(sorted(d)) or "all"
    return QA(f"how many {describe(d, plural=True)} are there ?", NUMBER_WORDS[n], "count", kind_name)


def _exist(rng: random.Random, scene: Scene, cfg: QuestionConfig) -> QA | None:
    objs = scene.objects
    values = {"size": SIZES, "color": tuple(COLORS), "shape": SHAPES}
    subsets = [("shape",), ("color",), ("color", "shape"), ("size", "shape"), ("size", "color"),
               ("size", "color", "shape")]
    want_yes = rng.random() < 0.5
    if not objs:
        want_yes = False
    if want_yes:
        o = _pick_object(rng, objs, cfg)
        d = {a: getattr(o, a) for a in rng.choice(subsets)}
    else:
        for _ in range(20):
            if objs:
                o = _pick_object(rng, objs, cfg)
                d = {a: getattr(o, a) for a in rng.choice(subsets[2:])}
                a = rng.choice(list(d))
                d[a] = rng.choice([v for v in values[a] if v != d[a]])
            else:
                d = {a: rng.choice(values[a]) for a in rng.choice(subsets)}
            if not any(matches(o, d) for o in objs):
                break
        else:
            return None
    phrase = describe(d)
    ans = "yes" if any(matches(o, d) for o in objs) else "no"
    return QA(f"is there {_article(phrase)} {phrase} ?", ans, "exist", "+".join(sorted(d)))


def _attribute(rng: random.Random, scene: Scene, cfg: QuestionConfig) -> QA | None:
    objs = scene.objects
    if not objs:
        return None
    o = _pick_object(rng, objs, cfg)
    attr = rng.choice(_ATTRS)
    d = _unique_desc(o, objs, exclude=attr)
    if d is None:
        return None
    return QA(f"what {attr} is the {describe(d)} ?", getattr(o, attr), "attribute", attr)


def _spatial(rng: random.Random, scene: Scene, cfg: QuestionConfig) -> QA | None:
    objs = scene.objects
    if len(objs) < 2:
        return None
    a = _pick_object(rng, objs, cfg)
    b = _pick_object(rng, [o for o in objs if o is not a], cfg)
    horizontal = rng.random() < 0.5
    delta = (b.x - a.x) if horizontal else (b.y - a.y)  # > 0: a is left of / above b
    if abs(delta) < cfg.min_offset:
        return None
    da, db = _unique_desc(a, objs), _unique_desc(b, objs)
    if da is None or db is None:
        return None
    truth = ("left" if delta > 0 else "right") if horizontal else ("above" if delta > 0 else "below")
    want_yes = rng.random() < 0.5
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
    rel = truth if want_yes else opposite[truth]
    q = f"is the {describe(da)} {rel}{' of' if rel in ('left', 'right') else ''} the {describe(db)} ?"
    return QA(q, "yes" if want_yes else "no", "spatial", rel)


_ASKERS = {"count": _count, "exist": _exist, "attribute": _attribute, "spatial": _spatial}


def ask(rng: random.Random, scene: Scene, cfg: QuestionConfig = QuestionConfig(), qtype: str | None = None,
        tries: int = 30) -> QA | None:
    """One question about ``scene`` (of ``qtype``, or a type drawn from ``cfg.type_weights``).

    Returns None when no question of that type can be asked (e.g. ``spatial`` on a one-object scene).
    """
    for _ in range(tries):
        t = qtype or rng.choices(QTYPES, weights=cfg.type_weights)[0]
        qa = _ASKERS[t](rng, scene, cfg)
        if qa is not None:
            return qa
    return None


def ask_many(rng: random.Random, scene: Scene, n: int, cfg: QuestionConfig = QuestionConfig()) -> list[QA]:
    """Up to ``n`` distinct questions about ``scene`` (types drawn from the config's mix)."""
    out: list[QA] = []
    seen: set[str] = set()
    for _ in range(4 * n):
        if len(out) == n:
            break
        qa = ask(rng, scene, cfg)
        if qa is not None and qa.question not in seen:
            seen.add(qa.question)
            out.append(qa)
    return out
