"""The embedded models' data sets: procedural shapes VQA (two scene sizes) and easy-VQA, with fixed splits.

:class:`ShapesVQA` draws scene ``i`` of split ``s`` from the seed string ``"{name}/{s}/{i}"``, so
the splits are disjoint by construction and every item is the same on every machine. ``train``
is an unbounded stream (training sample ``i`` also draws its questions from that seed); ``val``
and ``test`` hold ``SPLIT_SCENES[split]`` scenes with one question of each type (count, exist,
attribute, spatial) per scene. ``shapes`` are the 96x96 scenes of ``tiny-llava``; ``shapes-large``
the larger canvases of ``tiny-llava-next``, with questions biased towards the small objects.

:class:`EasyVQA` reads the ``easy_vqa`` package's train/test questions and 64x64 images (offline).
Its question types: ``attribute`` (``color`` / ``shape``) and ``exist`` (``plain`` / ``negated``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

from vtc.errors import ConfigError
from vtc.models.tiny.questions import QA, QTYPES, QuestionConfig, ask, ask_many
from vtc.models.tiny.render import render, render_labels
from vtc.models.tiny.scene import LARGE_SCENES, SMALL_SCENES, Scene, SceneConfig, generate_scene

__all__ = ["Item", "ShapesVQA", "EasyVQA", "SPLIT_SCENES", "DATASETS", "dataset"]

#: number of scenes in the fixed splits
SPLIT_SCENES = {"val": 250, "test": 1000}


@dataclass
class Item:
    """One question about one image. ``scene`` (and ``labels``) only for procedural items."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    detail: str
    dataset: str
    key: str
    scene: Scene | None = None
    labels: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ShapesVQA:
    """Procedural shapes VQA (see the module docstring)."""

    name: str = "shapes"
    scenes: SceneConfig = SMALL_SCENES
    questions: QuestionConfig = QuestionConfig()

    def _check(self, split: str) -> None:
        if split not in ("train", *SPLIT_SCENES):
            raise ConfigError(f"{self.name}: unknown split {split!r}; use 'train', 'val' or 'test'")

    def scene(self, split: str, i: int) -> Scene:
        """Scene ``i`` of ``split``."""
        self._check(split)
        return generate_scene(f"{self.name}/{split}/{i}", self.scenes)

    def train_sample(self, i: int, turns: int) -> tuple[Scene, list[QA]]:
        """Training scene ``i`` and up to ``turns`` distinct questions about it."""
        scene = self.scene("train", i)
        return scene, ask_many(random.Random(f"{self.name}/train/{i}/questions"), scene, turns, self.questions)

    def __len__(self) -> int:  # pragma: no cover - convenience
        return SPLIT_SCENES["test"] * len(QTYPES)

    def items(self, split: str = "test", limit: int | None = None, with_labels: bool = False) -> list[Item]:
        """The fixed items of ``val`` / ``test``: one per question type per scene, scene-major order."""
        self._check(split)
        if split == "train":
            raise ConfigError(f"{self.name}: 'train' is a stream; use train_sample(i, turns)")
        out: list[Item] = []
        for i in range(SPLIT_SCENES[split]):
            scene = self.scene(split, i)
            img, labels = render(scene), render_labels(scene) if with_labels else None
            rng = random.Random(f"{self.name}/{split}/{i}/questions")
            for t in QTYPES:
                qa = ask(rng, scene, self.questions, qtype=t)
                if qa is None:
                    continue
                out.append(Item(img, qa.question, qa.answer, qa.qtype, qa.detail, self.name,
                                f"{self.name}/{split}/{i}/{t}", scene, labels))
                if limit is not None and len(out) >= limit:
                    return out
        return out


def _easy_qtype(question: str) -> tuple[str, str]:
    if question.startswith("what"):  # "what color is ...", "what is the color of ...", "what is the blue shape"
        return "attribute", "color" if " color " in f" {question} " else "shape"
    return "exist", "negated" if " not " in f" {question} " else "plain"


@lru_cache(maxsize=2)
def _easy_split(split: str) -> tuple[list[tuple[str, str, int]], dict[int, str]]:
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - a dependency of vtc
        raise ConfigError("easy-VQA needs the 'easy-vqa' package: pip install easy-vqa") from e
    if split == "train":
        qs, paths = easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    elif split == "test":
        qs, paths = easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
    else:
        raise ConfigError(f"easy-vqa has splits 'train' and 'test', not {split!r}")
    return list(zip(*qs)), paths


@lru_cache(maxsize=8192)
def _easy_image(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


@dataclass(frozen=True)
class EasyVQA:
    """easy-VQA (one shape per 64x64 image; colour, shape and yes/no questions), from the ``easy_vqa`` package."""

    name: str = "easy-vqa"

    def image_ids(self, split: str) -> list[int]:
        return sorted(_easy_split(split)[1])

    def image(self, split: str, image_id: int) -> Image.Image:
        return _easy_image(_easy_split(split)[1][image_id])

    def questions(self, split: str) -> dict[int, list[QA]]:
        """Image id -> its questions (in the package's order)."""
        out: dict[int, list[QA]] = {}
        for q, a, i in _easy_split(split)[0]:
            t, d = _easy_qtype(q)
            out.setdefault(i, []).append(QA(q, a, t, d))
        return out

    def train_sample(self, i: int, turns: int) -> tuple[Image.Image, list[QA]]:
        """Training sample ``i``: an image (cycling through the train images) and up to ``turns`` of its questions."""
        ids = self.image_ids("train")
        image_id = ids[i % len(ids)]
        qs = _easy_questions_by_image("train")[image_id]
        rng = random.Random(f"{self.name}/train/{i}")
        return self.image("train", image_id), rng.sample(qs, min(turns, len(qs)))

    def items(self, split: str = "test", limit: int | None = None, with_labels: bool = False) -> list[Item]:
        """Every question of ``split`` in the package's order (``limit``: the first ones)."""
        out = []
        for n, (q, a, i) in enumerate(_easy_split(split)[0]):
            if limit is not None and n >= limit:
                break
            t, d = _easy_qtype(q)
            out.append(Item(self.image(split, i), q, a, t, d, self.name, f"{self.name}/{split}/{n}"))
        return out


@lru_cache(maxsize=2)
def _easy_questions_by_image(split: str) -> dict[int, list[QA]]:
    return EasyVQA().questions(split)


DATASETS = {
    "shapes": ShapesVQA(),
    "shapes-large": ShapesVQA("shapes-large", LARGE_SCENES, QuestionConfig(small_weight=3.0)),
    "easy-vqa": EasyVQA(),
}


def dataset(name: str):
    """The data set registered as ``name`` (:data:`DATASETS`)."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}") from None
