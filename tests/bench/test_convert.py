"""vtc.bench.convert: each benchmark's release format to vtc JSONL, on hand-written miniature files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vtc.bench.convert import convert
from vtc.bench.loaders import load_jsonl
from vtc.cli import main
from vtc.errors import ConfigError


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _png(path: Path, color=(200, 40, 40), size=(24, 24)) -> bytes:
    """A small real image at ``path`` (whatever its extension says); returns its bytes."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")
    return path.read_bytes()


def test_vqav2(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What color?", "question_id": 420}, {"image_id": 7, "question": "Unanswered?", "question_id": 70}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 420, "image_id": 42, "answer_type": "other",
         "answers": [{"answer": "red", "answer_id": i + 1} for i in range(10)]}]}))
    out = tmp_path / "data" / "val.jsonl"
    _png(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    _png(tmp_path / "val2014" / "COCO_val2014_000000000007.jpg")
    assert main(["convert", "vqav2", "--out", str(out), "--questions", str(tmp_path / "q.json"), "--annotations",
                 str(tmp_path / "a.json"), "--images", str(tmp_path / "val2014")]) == 0
    (rec,) = _lines(out)
    assert rec == {"id": 420, "image": "../val2014/COCO_val2014_000000000042.jpg", "question": "What color?",
                   "answers": ["red"] * 10, "question_type": "other"}
    # the loader resolves the relative path; it leaves the JSONL's folder, which the user must allow
    (q,) = load_jsonl("val", out.parent, path="val.jsonl", allow_absolute_paths=True)
    assert Path(q.image) == (tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")


def test_gqa_textvqa_pope_scienceqa(tmp_path):
    (tmp_path / "gqa.json").write_text(json.dumps({"201": {"imageId": "n1", "question": "Is it red?", "answer": "no",
                                                           "types": {"structural": "verify"}}}))
    _png(tmp_path / "img" / "n1.jpg")
    _png(tmp_path / "ti" / "ab.jpg")
    _png(tmp_path / "coco" / "x.jpg")
    _png(tmp_path / "sqa" / "test" / "5" / "image.png")
    convert("gqa", tmp_path / "gqa.jsonl", questions=[str(tmp_path / "gqa.json")], images=str(tmp_path / "img"))
    assert _lines(tmp_path / "gqa.jsonl") == [{"id": "201", "image": "img/n1.jpg", "question": "Is it red?",
                                               "answers": ["no"], "question_type": "verify"}]
    (tmp_path / "tv.json").write_text(json.dumps({"data": [{"question_id": 3, "image_id": "ab", "question": "Brand?",
                                                            "answers": ["nike"] * 10}]}))
    convert("textvqa", tmp_path / "tv.jsonl", questions=[str(tmp_path / "tv.json")], images=str(tmp_path / "ti"))
    assert _lines(tmp_path / "tv.jsonl")[0]["image"] == "ti/ab.jpg"
    pope = tmp_path / "coco_pope_adversarial.json"
    pope.write_text('{"question_id": 1, "image": "x.jpg", "text": "Is there a dog?", "label": "yes"}\n')
    convert("pope", tmp_path / "pope.jsonl", questions=[str(pope)], images=str(tmp_path / "coco"))
    assert _lines(tmp_path / "pope.jsonl") == [{"id": "adversarial-1", "image": "coco/x.jpg", "question": "Is there a dog?",
                                                "answers": ["yes"], "question_type": "adversarial"}]
    (tmp_path / "problems.json").write_text(json.dumps({
        "5": {"question": "Which is a mammal?", "choices": ["frog", "cat"], "answer": 1, "hint": "Look.",
              "image": "image.png", "split": "test", "subject": "natural science"},
        "6": {"question": "No image", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None, "split": "test"},
        "7": {"question": "Train", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png", "split": "train"}}))
    n = convert("scienceqa", tmp_path / "sqa.jsonl", questions=[str(tmp_path / "problems.json")],
                images=str(tmp_path / "sqa"), split="test")
    assert n == 1
    (rec,) = _lines(tmp_path / "sqa.jsonl")
    assert rec["question"] == "Context: Look.\nWhich is a mammal?\nA. frog\nB. cat" and rec["answers"] == ["B"]
    assert rec["image"] == "sqa/test/5/image.png"


def test_mme_layouts(tmp_path):
    root = tmp_path / "MME"
    (root / "color").mkdir(parents=True)
    _png(root / "color" / "1.jpg")
    (root / "color" / "1.txt").write_text("Is it red? Please answer yes or no.\tYes\nIs it blue? Please answer yes or no.\tNo\n")
    (root / "artwork" / "images").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN").mkdir()
    _png(root / "artwork" / "images" / "9.png")
    (root / "artwork" / "questions_answers_YN" / "9.txt").write_text("Is this a painting?\tYes\n")
    assert convert("mme", tmp_path / "mme.jsonl", images=str(root)) == 3
    recs = _lines(tmp_path / "mme.jsonl")
    assert [r["id"] for r in recs] == ["artwork/9/0", "color/1/0", "color/1/1"]
    assert recs[2]["answers"] == ["No"] and recs[2]["question_type"] == "color" and recs[2]["group"] == "color/1"


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown format"):
        convert("coco", tmp_path / "x.jsonl")
    with pytest.raises(ConfigError, match="--questions"):
        convert("gqa", tmp_path / "x.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        convert("gqa", tmp_path / "x.jsonl", questions=[str(tmp_path / "missing.json")])
