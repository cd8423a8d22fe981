"""Converters from the public VQA benchmarks' release files to vtc's JSONL task format.

``vtc convert FORMAT --out FILE.jsonl ...`` writes one question per line (see
:mod:`vtc.bench.loaders`), with image paths relative to the output file. Formats (the files each
benchmark distributes; nothing is downloaded), with the metric each file is scored by:

- ``vqav2`` (``vqa``): ``--questions v2_OpenEnded_mscoco_val2014_questions.json --annotations
  v2_mscoco_val2014_annotations.json --images val2014/``; ten answers, question type = answer
  type (yes/no, number, other). Without ``--annotations`` (test-dev): no answers, a submission.
- ``gqa`` (``exact``): ``--questions testdev_balanced_questions.json --images images/``; one
  answer, question type = the structural type (verify, query, choose, logical, compare).
- ``textvqa`` (``textvqa``): ``--questions TextVQA_0.5.1_val.json --images train_images/``; ten
  answers. The test split (``TextVQA_0.5.1_test.json --images test_images/``) has none: its
  questions are answered, not scored, and the report writes the submission file.
- ``pope`` (``pope``): ``--questions coco_pope_adversarial.json coco_pope_popular.json ...
  --images val2014/``; POPE's JSON-lines files (``question_id``, ``image``, ``text``, ``label``),
  question type = the category taken from each file name, ids prefixed by it.
- ``scienceqa`` (``mc``): ``--questions problems.json --images images/ --split test``; questions
  with an image only, the hint as context and lettered choices in the question, the letter as answer.
- ``mme`` (``mme``): ``--images MME_Benchmark_release_version/``; each subtask folder holds images
  and ``question<TAB>answer`` text files (beside the images or in ``questions_answers_YN/``);
  ``group`` = the image (MME's acc+ pairs).
- ``mmbench`` (``mmbench``): ``--questions MMBench_DEV_EN.tsv`` (the TSV with base64 images:
  ``index, question, hint, A..D, answer, category, l2-category, image``); images are decoded into
  ``--images`` (default ``<out>_images/``). CircularEval: a file that already holds the circular
  passes (indices >= 1,000,000, as VLMEvalKit's) keeps them; otherwise each question with ``n``
  options gets ``n`` passes with the options rotated (``--no-circular``: the original order only).
  ``group`` = the question, ``choices`` = the pass's options, the letter as answer.
- ``seed`` (``seed``): ``--questions SEED-Bench.json --images SEED-Bench-image/``; the image
  questions (``data_type: image``), the four choices lettered in the question, question type = the
  evaluation dimension.
- ``mmstar`` (``mmstar``): ``--questions MMStar.tsv`` (VLMEvalKit's TSV, base64 images) or the
  Hugging Face release's ``mmstar.parquet`` (needs ``pyarrow``); images are decoded into
  ``--images``; question type = the category.
- ``ocrbench`` (``ocrbench``): ``--questions OCRBench.json --images OCRBench_Images/``; answers as
  released, question type = the OCRBench type, ``dataset`` = the source dataset (HME100k's rule).
- ``vizwiz`` (``vizwiz``): ``--questions val.json --images val/`` (or ``test.json`` / ``test/``,
  without answers: a submission); ten answers, question type = answer type, ``image_name`` for
  the submission.

Every image a file names must exist under ``--images``: the converter checks them all and stops
with the missing ones named (``--skip-missing`` drops those questions instead, and says how many).
"""

from __future__ import annotations

import base64
import csv
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vtc.errors import ConfigError

__all__ = ["convert", "FORMATS", "CIRCULAR"]

#: MMBench's circular passes carry indices ``index + pass * CIRCULAR``
CIRCULAR = 1_000_000
_LETTERS = "ABCDEFGHIJ"


def _load(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{str(path)!r} is not JSON: {e}") from e


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() in ("", "nan", "NaN", "None")


def _read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a TSV (or a parquet file, with pyarrow) as dicts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} does not exist")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ConfigError(f"reading {path.name} needs pyarrow (pip install pyarrow), or pass the TSV release") from e
        return pq.read_table(path).to_pylist()
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if not rows or "index" not in rows[0]:
        raise ConfigError(f"{str(path)!r} is not a benchmark TSV (a header with an 'index' column, tab-separated)")
    return rows


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, dict):  # parquet image struct {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return base64.b64decode(str(value))


def _write_image(data: bytes, folder: Path, stem: str) -> Path:
    ext = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}{ext}"
    path.write_bytes(data)
    return path


def _embedded_images(rows: list[dict[str, Any]], folder: Path) -> dict[str, Path]:
    """index -> written image; a short all-digit ``image`` field names another row's image (VLMEvalKit)."""
    raw = {str(r["index"]): r.get("image") for r in rows}
    out: dict[str, Path] = {}
    for idx, value in raw.items():
        ref = str(value).strip() if isinstance(value, str) else None
        if ref is not None and ref.isdigit() and len(ref) < 64:
            continue
        if not isinstance(value, (bytes, bytearray, dict)) and _missing(value):
            raise ConfigError(f"row {idx} has no image")
        try:
            out[idx] = _write_image(_image_bytes(value), folder, idx)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"row {idx}: the image field is not base64 image data ({e})") from e
    for idx, value in raw.items():
        if idx not in out:
            target = str(value).strip()
            if target not in out:
                raise ConfigError(f"row {idx} refers to the image of row {target}, which has none")
            out[idx] = out[target]
    return out


def _vqav2(questions: Sequence[str], images: str, annotations: str | None = None, **_: Any) -> Iterator[dict]:
    q = _load(questions[0])
    subtype = q.get("data_subtype", "val2014")
    anns = {a["question_id"]: a for a in _load(annotations)["annotations"]} if annotations else None
    for item in q["questions"]:
        a = anns.get(item["question_id"]) if anns is not None else None
        if anns is not None and a is None:
            continue
        yield {"id": item["question_id"], "image": Path(images) / f"COCO_{subtype}_{item['image_id']:012d}.jpg",
               "question": item["question"], "answers": [x["answer"] for x in a["answers"]] if a else [],
               "question_type": a.get("answer_type") if a else None}


def _gqa(questions: Sequence[str], images: str, **_: Any) -> Iterator[dict]:
    for qid, item in _load(questions[0]).items():
        yield {"id": qid, "image": Path(images) / f"{item['imageId']}.jpg", "question": item["question"],
               "answers": [item["answer"]] if "answer" in item else [],
               "question_type": (item.get("types") or {}).get("structural")}


def _textvqa(questions: Sequence[str], images: str, **_: Any) -> Iterator[dict]:
    for item in _load(questions[0])["data"]:
        yield {"id": item["question_id"], "image": Path(images) / f"{item['image_id']}.jpg",
               "question": item["question"], "answers": list(item.get("answers") or [])}


def _pope(questions: Sequence[str], images: str, **_: Any) -> Iterator[dict]:
    for file in questions:
        category = Path(file).stem.split("_")[-1]
        if not Path(file).is_file():
            raise ConfigError(f"{file!r} does not exist")
        with open(file, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                item = json.loads(line)
                yield {"id": f"{category}-{item['question_id']}", "image": Path(images) / item["image"],
                       "question": item["text"], "answers": [item["label"]], "question_type": category}


def _lettered(question: str, options: Sequence[str], hint: str | None = None, context: str = "") -> str:
    lines = "\n".join(f"{_LETTERS[i]}. {o}" for i, o in enumerate(options))
    head = f"{context}{hint}\n" if hint else context
    return f"{head}{question}\n{lines}"


def _scienceqa(questions: Sequence[str], images: str, split: str = "test", **_: Any) -> Iterator[dict]:
    for pid, item in _load(questions[0]).items():
        if item.get("split") != split or not item.get("image"):
            continue
        context = f"Context: {item['hint']}\n" if item.get("hint") else ""
        yield {"id": pid, "image": Path(images) / split / pid / item["image"],
               "question": f"{context}{_lettered(item['question'], item['choices'])}",
               "answers": [_LETTERS[int(item["answer"])]], "question_type": item.get("subject")}


def _mme(images: str, **_: Any) -> Iterator[dict]:
    root = Path(images)
    if not root.is_dir():
        raise ConfigError(f"mme: {str(root)!r} is not a folder (pass the release folder as --images)")
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
                       "answers": [answer.strip()], "question_type": task.name, "group": f"{task.name}/{txt.stem}"}


def _image_dir(images: str | None, out: Path) -> Path:
    return Path(images) if images not in (None, ".") else out.parent / f"{out.stem}_images"


def _mmbench(questions: Sequence[str], images: str | None, out: Path, circular: bool = True, **_: Any) -> Iterator[dict]:
    rows = _read_table(questions[0])
    files = _embedded_images(rows, _image_dir(images, out))
    by_index = {int(float(r["index"])): r for r in rows}
    has_passes = any(i >= CIRCULAR for i in by_index)
    for idx in sorted(by_index):
        r = by_index[idx]
        options = [str(r[c]) for c in "ABCDE" if c in r and not _missing(r[c])]
        if len(options) < 2:
            raise ConfigError(f"mmbench row {idx} has {len(options)} options; a question needs A and B at least")
        answer = None if _missing(r.get("answer")) else str(r["answer"]).strip()
        hint = None if _missing(r.get("hint")) else str(r["hint"])
        base = idx % CIRCULAR
        if idx >= CIRCULAR and not circular:
            continue
        passes = [0] if (has_passes or not circular) else range(len(options))
        for k in passes:
            rot = options[k:] + options[:k]  # pass k: option i shows the original option i + k
            gold = answer if (k == 0 or answer is None) else _LETTERS[(_LETTERS.index(answer) - k) % len(options)]
            rid = idx if k == 0 else base + k * CIRCULAR
            yield {"id": str(rid), "image": files[str(r["index"])], "question": _lettered(str(r["question"]), rot, hint),
                   "answers": [gold] if gold else [], "question_type": None if _missing(r.get("category")) else r["category"],
                   "group": str(base), "pass": idx // CIRCULAR if has_passes else k,
                   "choices": {_LETTERS[i]: o for i, o in enumerate(rot)},
                   "l2_category": None if _missing(r.get("l2-category")) else r["l2-category"]}


def _seed(questions: Sequence[str], images: str, **_: Any) -> Iterator[dict]:
    data = _load(questions[0])
    if not isinstance(data, dict) or "questions" not in data:
        raise ConfigError("seed: expected SEED-Bench.json ({'questions': [...], 'question_type': {...}})")
    names = {int(v): k for k, v in (data.get("question_type") or {}).items()}
    root = Path(images)
    for item in data["questions"]:
        if item.get("data_type", "image") != "image":
            continue
        image = root / str(item["data_id"])
        if not image.is_file():  # the release names image data without an extension in places
            image = next((root / f"{item['data_id']}{e}" for e in (".jpg", ".png") if (root / f"{item['data_id']}{e}").is_file()),
                         image)
        options = [item[f"choice_{c}"] for c in "abcd"]
        yield {"id": str(item["question_id"]), "image": image, "question": _lettered(item["question"], options),
               "answers": [item["answer"]] if item.get("answer") else [],
               "question_type": names.get(int(item.get("question_type_id", 0)), item.get("question_type_id"))}


def _mmstar(questions: Sequence[str], images: str | None, out: Path, **_: Any) -> Iterator[dict]:
    rows = _read_table(questions[0])
    files = _embedded_images(rows, _image_dir(images, out))
    for r in rows:
        yield {"id": str(r["index"]), "image": files[str(r["index"])], "question": str(r["question"]),
               "answers": [] if _missing(r.get("answer")) else [str(r["answer"]).strip()],
               "question_type": r.get("category"), "l2_category": r.get("l2_category")}


def _ocrbench(questions: Sequence[str], images: str, **_: Any) -> Iterator[dict]:
    data = _load(questions[0])
    if not isinstance(data, list):
        raise ConfigError("ocrbench: expected OCRBench.json, a list of {dataset_name, id, image_path, question, answers, type}")
    for item in data:
        answers = item.get("answers", [])
        yield {"id": str(item["id"]), "image": Path(images) / item["image_path"], "question": item["question"],
               "answers": [answers] if isinstance(answers, str) else [str(a) for a in answers],
               "question_type": item.get("type"), "dataset": item.get("dataset_name")}


def _vizwiz(questions: Sequence[str], images: str, **_: Any) -> Iterator[dict]:
    data = _load(questions[0])
    if not isinstance(data, list):
        raise ConfigError("vizwiz: expected the annotation file (val.json / test.json), a list of {image, question, answers}")
    for item in data:
        name = item["image"]
        yield {"id": Path(name).stem, "image": Path(images) / name, "question": item["question"],
               "answers": [a["answer"] if isinstance(a, dict) else str(a) for a in item.get("answers") or []],
               "question_type": item.get("answer_type"), "image_name": name}


FORMATS = {"vqav2": _vqav2, "gqa": _gqa, "textvqa": _textvqa, "pope": _pope, "scienceqa": _scienceqa, "mme": _mme,
           "mmbench": _mmbench, "seed": _seed, "mmstar": _mmstar, "ocrbench": _ocrbench, "vizwiz": _vizwiz}
#: formats whose images live inside the question file (decoded into --images) rather than in --images
EMBEDDED = {"mmbench", "mmstar"}


def convert(fmt: str, out: str | Path, *, questions: Sequence[str] = (), images: str | None = ".",
            annotations: str | None = None, split: str = "test", circular: bool = True,
            skip_missing: bool = False) -> int:
    """Write ``out`` in vtc JSONL from a benchmark's files; returns the number of questions written."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; available: {', '.join(FORMATS)}")
    if fmt != "mme" and not questions:
        raise ConfigError(f"{fmt} needs --questions FILE")
    out = Path(out)
    if fmt not in EMBEDDED and fmt != "mme" and not Path(images or ".").is_dir():
        raise ConfigError(f"{fmt}: --images {images!r} is not a folder; pass the folder holding the benchmark's images")
    out.parent.mkdir(parents=True, exist_ok=True)
    records = list(FORMATS[fmt](questions=list(questions), images=images, annotations=annotations, split=split,
                                out=out, circular=circular))
    missing = [r for r in records if not Path(r["image"]).is_file()]
    if missing and not skip_missing:
        shown = ", ".join(str(r["image"]) for r in missing[:3])
        raise ConfigError(f"{fmt}: {len(missing)} of {len(records)} images named by the questions are not under --images "
                          f"{images!r} (e.g. {shown}); pass the folder that holds them, or --skip-missing to drop those "
                          "questions")
    if missing:
        print(f"vtc convert {fmt}: skipped {len(missing)} questions whose image is missing", file=sys.stderr)
        records = [r for r in records if Path(r["image"]).is_file()]
    base = out.parent.resolve()
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            rec["image"] = os.path.relpath(Path(rec["image"]).resolve(), base)
            rec = {k: v for k, v in rec.items() if v is not None}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return len(records)
