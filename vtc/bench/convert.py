"""Converters from the public VQA benchmarks' release files to vtc's JSONL task format.

``vtc convert FORMAT --out FILE.jsonl ...`` writes one question per line (see
:mod:`vtc.bench.loaders`), with image paths relative to the output file. Formats (the files each
benchmark distributes; nothing is downloaded):

- ``vqav2``: ``--questions v2_OpenEnded_mscoco_val2014_questions.json --annotations
  v2_mscoco_val2014_annotations.json --images val2014/``; ten answers, question type = answer
  type (yes/no, number, other).
- ``gqa``: ``--questions testdev_balanced_questions.json --images images/``; one answer,
  question type = the structural type (verify, query, choose, logical, compare).
- ``textvqa``: ``--questions TextVQA_0.5.1_val.json --images train_images/``; ten answers.
- ``pope``: ``--questions coco_pope_adversarial.json coco_pope_popular.json ... --images
  val2014/``; POPE's JSON-lines files (``question_id``, ``image``, ``text``, ``label``), question
  type = the category taken from each file name, ids prefixed by it.
- ``scienceqa``: ``--questions problems.json --images images/ --split test``; questions with an
  image only, the hint as context and lettered choices in the question, the letter as answer.
- ``mme``: ``--images MME_Benchmark_release_version/``; each subtask folder holds images and
  ``question<TAB>answer`` text files (beside the images or in ``questions_answers_YN/``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vtc.errors import ConfigError

__all__ = ["convert", "FORMATS"]


def _load(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{str(path)!r} is not JSON: {e}") from e


def _vqav2(questions: Sequence[str], images: str, annotations: str | None = None, **_: Any) -> Iterator[dict]:
    if annotations is None:
        raise ConfigError("vqav2 needs --annotations (test-dev has no public answers; use val2014)")
    q = _load(questions[0])
    subtype = q.get("data_subtype", "val2014")
    anns = {a["question_id"]: a for a in _load(annotations)["annotations"]}
    for item in q["questions"]:
        a = anns.get(item["question_id"])
        if a is None:
            continue
        yield {"id": item["question_id"], "image": Path(images) / f"COCO_{subtype}_{item['image_id']:012d}.jpg",
               "question": item["question"], "answers": [x["answer"] for x in a["answers"]],
               "question_type": a.get("answer_type")}


def _gqa(questions: Sequence[str], images: str, **_: Any) -> Iterator[dict]:
    for qid, item in _load(questions[0]).items():
        yield {"id": qid, "image": Path(images) / f"{item['imageId']}.jpg", "question": item["question"],
               "answers": [item["answer"]], "question_type": (item.get("types") or {}).get("structural")}


def _textvqa(questions: Sequence[str], images: str, **_: Any) -> Iterator[dict]:
    for item in _load(questions[0])["data"]:
        yield {"id": item["question_id"], "image": Path(images) / f"{item['image_id']}.jpg",
               "question": item["question"], "answers": item["answers"]}


def _pope(questions: Sequence[str], images: str, **_: Any) -> Iterator[dict]:
    for file in questions:
        category = Path(file).stem.split("_")[-1]
        with open(file, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                item = json.loads(line)
                yield {"id": f"{category}-{item['question_id']}", "image": Path(images) / item["image"],
                       "question": item["text"], "answers": [item["label"]], "question_type": category}


def _scienceqa(questions: Sequence[str], images: str, split: str = "test", **_: Any) -> Iterator[dict]:
    letters = "ABCDEFGHIJ"
    for pid, item in _load(questions[0]).items():
        if item.get("split") != split or not item.get("image"):
            continue
        choices = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(item["choices"]))
        context = f"Context: {item['hint']}\n" if item.get("hint") else ""
        yield {"id": pid, "image": Path(images) / split / pid / item["image"],
               "question": f"{context}{item['question']}\n{choices}", "answers": [letters[int(item["answer"])]],
               "question_type": item.get("subject")}


def _mme(images: str, **_: Any) -> Iterator[dict]:
    root = Path(images)
    if not root.is_dir():
        raise ConfigError(f"mme: {str(root)!r} is not a folder")
    for task in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = task / "questions_answers_YN" if (task / "questions_answers_YN").is_dir() else task
        img_dir = task / "images" if (task / "images").is_dir() else task
        for txt in sorted(qa_dir.glob("*.txt")):
            img = next((img_dir / f"{txt.stem}{ext}" for ext in (".jpg", ".png", ".jpeg")
                        if (img_dir / f"{txt.stem}{ext}").is_file()), None)
            if img is None:
                continue
            for i, line in enumerate(txt.read_text(encoding="utf-8").splitlines()):
                if "\t" not in line:
                    continue
                question, answer = line.rsplit("\t", 1)
                yield {"id": f"{task.name}/{txt.stem}/{i}", "image": img, "question": question.strip(),
                       "answers": [answer.strip()], "question_type": task.name}


FORMATS = {"vqav2": _vqav2, "gqa": _gqa, "textvqa": _textvqa, "pope": _pope, "scienceqa": _scienceqa, "mme": _mme}


def convert(fmt: str, out: str | Path, *, questions: Sequence[str] = (), images: str = ".",
            annotations: str | None = None, split: str = "test") -> int:
    """Write ``out`` in vtc JSONL from a benchmark's files; returns the number of questions."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; available: {', '.join(FORMATS)}")
    if fmt != "mme" and not questions:
        raise ConfigError(f"{fmt} needs --questions FILE")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent.resolve()
    n = 0
    with out.open("w", encoding="utf-8") as fh:
        for rec in FORMATS[fmt](questions=list(questions), images=images, annotations=annotations, split=split):
            img = Path(rec["image"]).resolve()
            rec["image"] = os.path.relpath(img, base)
            rec = {k: v for k, v in rec.items() if v is not None}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n
