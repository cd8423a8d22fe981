"""Question loaders: where a task's questions come from, registered by name.

A loader is a function ``loader(split: str, base_dir: Path, **options) -> Iterable[Question]``
registered with :func:`register_loader` (``"easy_vqa"``, ``"jsonl"``; the embedded model's scene
generator registers ``"tiny_scenes"``). A task manifest may also name a function of an allowed
plugin module (:mod:`vtc.bench.trust`) as ``"package.module:function"``. Loaders never open images: a :class:`Question` carries a path (or
an in-memory image, or a function making one) and the runner opens it, so an unreadable image
becomes an error row instead of stopping the run. A malformed source record becomes a Question
whose ``error`` says what is wrong.

JSONL format (one question per line; paths relative to the JSONL file, or to ``image_root``)::

    {"id": "q1", "image": "images/1.jpg", "question": "Is there a dog?", "answers": ["yes"],
     "question_type": "yes/no"}

``answers`` may also be a single string ``answer``; ``"answers": []`` marks a question without a
public answer (a test split): it is answered, not scored, and the report writes its predictions
as a submission file; ``id`` (or ``question_id``) defaults to the
line number; ``question_type`` (or ``qtype``) is optional. VQAv2, GQA, TextVQA, POPE,
ScienceQA-IMG, MME, MMBench, SEED-Bench, MMStar, OCRBench and VizWiz convert to this with ``vtc convert``
(see eval/README.md).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtc.errors import ConfigError, InputError

__all__ = ["Question", "register_loader", "get_loader", "list_loaders", "load_easy_vqa", "load_jsonl"]


@dataclass
class Question:
    """One benchmark question. ``image``: a path, a PIL image, or a zero-argument function returning one."""

    qid: str
    image: Any
    question: str
    answers: list[str]
    qtype: str | None = None
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def load_image(self):
        """The image as an RGB ``PIL.Image`` (raises InputError naming the question when it cannot be read)."""
        from PIL import Image

        src = self.image
        try:
            if callable(src) and not isinstance(src, Image.Image):
                src = src()
            if isinstance(src, Image.Image):
                return src.convert("RGB")
            with Image.open(src) as im:
                return im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any decoder failure is the image's fault
            raise InputError(f"question {self.qid!r}: cannot read image {str(self.image)!r}: {type(e).__name__}: {e}") from e


Loader = Callable[..., Iterable[Question]]
_LOADERS: dict[str, Loader] = {}


def register_loader(name: str):
    """Decorator registering a question loader under ``name``."""

    def deco(fn: Loader) -> Loader:
        _LOADERS[name] = fn
        return fn

    return deco


def list_loaders() -> list[str]:
    return sorted(_LOADERS)


def get_loader(name: str) -> Loader:
    """The loader registered as ``name``, or the function named by ``"package.module:function"``."""
    if name in _LOADERS:
        return _LOADERS[name]
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"loader {name!r}: cannot import {attr!r} from {mod!r} ({e})") from e
        if not callable(fn):
            raise ConfigError(f"loader {name!r} is not a function")
        return fn
    # loaders that live with the models they serve register when their module is imported
    for module in _LAZY.get(name, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        if name in _LOADERS:
            return _LOADERS[name]
    raise ConfigError(f"unknown question loader {name!r}; registered: {', '.join(list_loaders())} "
                      "(or name a function as 'package.module:function')")


#: loader name -> modules that register it on import
_LAZY: dict[str, tuple[str, ...]] = {"tiny_scenes": ("vtc.models.tiny.bench",)}


# ----------------------------------------------------------------------------- easy-VQA
_EASY_SHAPES = frozenset({"circle", "rectangle", "triangle"})


@register_loader("easy_vqa")
def load_easy_vqa(split: str = "test", base_dir: Path | None = None) -> Iterator[Question]:
    """easy-VQA (the ``easy-vqa`` PyPI package; offline): 64x64 shapes, one-word answers.

    Question types are derived from the answer: ``yes/no``, ``shape`` or ``color``.
    """
    try:
        import easy_vqa
    except ImportError as e:
        raise ConfigError("the easy_vqa loader needs the easy-vqa package: pip install easy-vqa") from e
    if split not in ("train", "test"):
        raise ConfigError(f"easy_vqa has splits 'train' and 'test', got {split!r}")
    questions, answers, image_ids = (easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions)()
    paths = (easy_vqa.get_train_image_paths if split == "train" else easy_vqa.get_test_image_paths)()
    for i, (q, a, img) in enumerate(zip(questions, answers, image_ids)):
        qtype = "yes/no" if a in ("yes", "no") else "shape" if a in _EASY_SHAPES else "color"
        yield Question(qid=f"{split}-{i}", image=paths[img], question=q, answers=[a], qtype=qtype, meta={"image_id": img})


# ----------------------------------------------------------------------------- JSONL
@register_loader("jsonl")
def load_jsonl(split: str = "test", base_dir: Path | None = None, *, path: str, image_root: str | None = None,
               allow_absolute_paths: bool = False) -> Iterator[Question]:
    """Questions from a JSONL file (see the module docstring); ``{split}`` in ``path`` is replaced.

    Image paths (and ``image_root``) must resolve inside the JSONL file's folder unless
    ``allow_absolute_paths`` (the run's ``--allow-absolute-paths``; see :mod:`vtc.bench.trust`);
    one that does not raises :class:`~vtc.errors.ConfigError` before any question is answered.
    """
    from vtc.bench.trust import TrustPolicy

    policy = TrustPolicy(allow_absolute_paths=allow_absolute_paths)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    file = Path(path.format(split=split))
    file = file if file.is_absolute() else base / file
    if not file.is_file():
        raise ConfigError(f"JSONL task file {str(file)!r} does not exist (paths are relative to the task manifest)")
    home = file.parent
    root = Path(image_root) if image_root else home
    root = root if root.is_absolute() else home / root
    policy.check_path(root, home, f"{file.name}: image_root")
    with file.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            q = _jsonl_question(line, lineno, root, file.name)
            if q.error is None:
                policy.check_path(q.image, home, f"{file.name}:{lineno}: image path")
            yield q


def _jsonl_question(line: str, lineno: int, root: Path, fname: str) -> Question:
    where = f"{fname}:{lineno}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return Question(qid=f"line{lineno}", image=None, question="", answers=[], error=f"{where}: invalid JSON ({e})")
    if not isinstance(rec, dict):
        return Question(qid=f"line{lineno}", image=None, question="", answers=[], error=f"{where}: expected a JSON object")
    qid = str(rec.get("id", rec.get("question_id", f"line{lineno}")))
    answers = rec.get("answers", rec.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    problems = []
    if not isinstance(rec.get("image"), str) or not rec["image"]:
        problems.append("'image' (a path) is missing")
    if not isinstance(rec.get("question"), str) or not rec["question"].strip():
        problems.append("'question' is missing")
    if not isinstance(answers, list) or not all(isinstance(a, (str, int, float)) for a in answers):
        problems.append("'answers' (a list of strings; [] for a test split without public answers) is missing")
    if problems:
        return Question(qid=qid, image=None, question=str(rec.get("question", "")), answers=[],
                        error=f"{where}: " + "; ".join(problems))
    img = Path(rec["image"])
    meta = {k: v for k, v in rec.items() if k not in ("id", "question_id", "image", "question", "answers", "answer",
                                                       "question_type", "qtype")}
    return Question(qid=qid, image=os.path.normpath(img if img.is_absolute() else root / img), question=rec["question"],
                    answers=[str(a) for a in answers], qtype=rec.get("question_type", rec.get("qtype")), meta=meta)
