"""vtc convert for MMBench, SEED-Bench, MMStar, OCRBench, VizWiz and the TextVQA test split.

Each benchmark's release layout is made by hand here (a few questions, generated images),
converted through the CLI, then every converted file is run on the embedded tiny-llava model in
one bench run: scores with intervals for the answered ones, submission files for the test splits.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest

from vtc.bench.convert import CIRCULAR, convert
from vtc.cli import main
from vtc.errors import ConfigError


def _image(color, size=(32, 32)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _save(path: Path, color=(30, 30, 200)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_image(color))


def _tsv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _b64(color) -> str:
    return base64.b64encode(_image(color)).decode()


def make_releases(root: Path) -> dict[str, list[str]]:
    """Release-layout files of each benchmark under ``root``; returns the ``vtc convert`` argument lists."""
    root.mkdir(parents=True, exist_ok=True)
    # MMBench dev TSV (VLMEvalKit / OpenCompass layout): base64 images; row 2 reuses row 1's image by index
    _tsv(root / "MMBench_DEV_EN.tsv",
         ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category", "split"],
         [[1, "What colour is the image?", "nan", "red", "blue", "green", "nan", "A", "attribute_recognition",
           _b64((220, 30, 30)), "x", "finegrained_perception", "dev"],
          [2, "Which shape?", "Look closely.", "circle", "square", "triangle", "cross", "D", "object_localization",
           "1", "x", "finegrained_perception", "dev"]])
    # SEED-Bench v1: one JSON, images named by data_id (with or without the extension); a video question
    seed = {"question_type": {"Scene Understanding": 1, "Instance Counting": 5, "Action Recognition": 10},
            "questions": [
                {"answer": "A", "choice_a": "red", "choice_b": "blue", "choice_c": "green", "choice_d": "gray",
                 "data_id": "1454426_2591111986.jpg", "data_type": "image", "question": "What colour dominates?",
                 "question_id": "101669", "question_type_id": 1},
                {"answer": "C", "choice_a": "One", "choice_b": "Two", "choice_c": "Three", "choice_d": "Four",
                 "data_id": "77_123", "data_type": "image", "question": "How many towels are in the image?",
                 "question_id": "101670", "question_type_id": 5},
                {"answer": "B", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d", "data_id": "v1.mp4",
                 "data_type": "video", "question": "What happens?", "question_id": "900001", "question_type_id": 10}]}
    (root / "SEED-Bench.json").write_text(json.dumps(seed))
    _save(root / "SEED-Bench-image" / "1454426_2591111986.jpg")
    _save(root / "SEED-Bench-image" / "77_123.jpg")
    # MMStar (VLMEvalKit TSV): the options are part of the question
    _tsv(root / "MMStar.tsv", ["index", "question", "answer", "category", "l2_category", "image", "bench"],
         [[0, "Which colour is shown?\nOptions: A: red, B: blue, C: green, D: white", "A", "coarse perception",
           "image scene and topic", _b64((220, 30, 30)), "x"],
          [1, "How many objects?\nOptions: A: 1, B: 2, C: 3, D: 4", "B", "fine-grained perception", "object counting",
           _b64((30, 220, 30)), "x"]])
    # OCRBench: OCRBench.json + OCRBench_Images/<dataset>/...
    ocr = [{"dataset_name": "IIIT5K", "id": 0, "image_path": "IIIT5K/test/1_1.png", "question": "what is written in the image?",
            "answers": ["CAT"], "type": "Regular Text Recognition"},
           {"dataset_name": "HME100k", "id": 1, "image_path": "HME100k/train_1.jpg",
            "question": "Please write out the expression of the formula in the image using LaTeX format.",
            "answers": "x ^ { 2 }", "type": "Handwritten Mathematical Expression Recognition"}]
    (root / "OCRBench.json").write_text(json.dumps(ocr))
    _save(root / "OCRBench_Images" / "IIIT5K" / "test" / "1_1.png")
    _save(root / "OCRBench_Images" / "HME100k" / "train_1.jpg")
    # VizWiz: val.json with ten answers, test.json without
    val = [{"image": f"VizWiz_val_0000000{i}.jpg", "question": "What colour is this?", "answer_type": "other",
            "answerable": 1, "answers": [{"answer": a, "answer_confidence": "yes"} for a in ["red"] * 6 + ["pink"] * 4]}
           for i in range(2)]
    (root / "vizwiz").mkdir()
    (root / "vizwiz" / "val.json").write_text(json.dumps(val))
    (root / "vizwiz" / "test.json").write_text(json.dumps([{"image": "VizWiz_test_00000000.jpg", "question": "What is it?"}]))
    for i in range(2):
        _save(root / "vizwiz" / "val" / f"VizWiz_val_0000000{i}.jpg", (200, 30, 30))
    _save(root / "vizwiz" / "test" / "VizWiz_test_00000000.jpg")
    # TextVQA test split: no answers
    tv = {"dataset_type": "test", "data": [{"question": "what brand is this?", "image_id": "003a8ae2ef43b901",
                                            "question_id": 34602, "image_classes": ["Bottle"]},
                                           {"question": "what is the number?", "image_id": "0054c91397f2fe05",
                                            "question_id": 34603, "image_classes": ["Sign"]}]}
    (root / "TextVQA_0.5.1_test.json").write_text(json.dumps(tv))
    for name in ("003a8ae2ef43b901", "0054c91397f2fe05"):
        _save(root / "test_images" / f"{name}.jpg")
    return {
        "mmbench": ["mmbench", "--questions", str(root / "MMBench_DEV_EN.tsv")],
        "seed": ["seed", "--questions", str(root / "SEED-Bench.json"), "--images", str(root / "SEED-Bench-image")],
        "mmstar": ["mmstar", "--questions", str(root / "MMStar.tsv")],
        "ocrbench": ["ocrbench", "--questions", str(root / "OCRBench.json"), "--images", str(root / "OCRBench_Images")],
        "vizwiz": ["vizwiz", "--questions", str(root / "vizwiz" / "val.json"), "--images", str(root / "vizwiz" / "val")],
        "vizwiz_test": ["vizwiz", "--questions", str(root / "vizwiz" / "test.json"), "--images", str(root / "vizwiz" / "test")],
        "textvqa_test": ["textvqa", "--questions", str(root / "TextVQA_0.5.1_test.json"), "--images", str(root / "test_images")],
    }


#: task name -> (metric, prompt suffix)
TASKS = {"mmbench": ("mmbench", "\nAnswer with the option's letter from the given choices directly."),
         "seed": ("seed", "\nAnswer with the option's letter from the given choices directly."),
         "mmstar": ("mmstar", "\nAnswer with the option's letter from the given choices directly"),
         "ocrbench": ("ocrbench", ""), "vizwiz": ("vizwiz", "\nAnswer the question using a single word or phrase."),
         "vizwiz_test": ("vizwiz", "\nAnswer the question using a single word or phrase."),
         "textvqa_test": ("textvqa", "\nAnswer the question using a single word or phrase.")}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("releases")
    data = root / "data"
    for name, args in make_releases(root / "release").items():
        assert main(["convert", *args, "--out", str(data / f"{name}.jsonl")]) == 0
    return data


def test_mmbench_circular_passes(converted):
    recs = _lines(converted / "mmbench.jsonl")
    # 3 options -> 3 passes, 4 options -> 4 passes; the gold letter follows its option round the rotation
    assert len(recs) == 7 and [r["group"] for r in recs] == ["1"] * 3 + ["2"] * 4
    q1 = [r for r in recs if r["group"] == "1"]
    assert [r["id"] for r in q1] == ["1", str(1 + CIRCULAR), str(1 + 2 * CIRCULAR)]
    assert [r["answers"] for r in q1] == [["A"], ["C"], ["B"]]                  # "red" is A, then C, then B
    assert [r["choices"][r["answers"][0]] for r in q1] == ["red"] * 3
    assert q1[1]["question"] == "What colour is the image?\nA. blue\nB. green\nC. red"
    q2 = [r for r in recs if r["group"] == "2"][0]
    assert q2["question"].startswith("Look closely.\nWhich shape?\nA. circle") and q2["answers"] == ["D"]
    # row 2 named row 1's image by index: both point at the one decoded file
    assert q1[0]["image"] == q2["image"] and (converted / q2["image"]).is_file()
    assert q2["question_type"] == "object_localization" and q2["pass"] == 0


def test_mmbench_file_with_its_own_passes(tmp_path):
    rows = [[i, "Q?", "nan", "x", "y", "nan", "nan", a, "cat", _b64((9, 9, 9)) if i == 5 else "5"]
            for i, a in ((5, "A"), (5 + CIRCULAR, "B"))]
    _tsv(tmp_path / "mm.tsv", ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"], rows)
    assert convert("mmbench", tmp_path / "mm.jsonl", questions=[str(tmp_path / "mm.tsv")]) == 2   # kept, not re-rotated
    assert [r["pass"] for r in _lines(tmp_path / "mm.jsonl")] == [0, 1]
    assert convert("mmbench", tmp_path / "one.jsonl", questions=[str(tmp_path / "mm.tsv")], circular=False) == 1


def test_other_formats(converted):
    seed = _lines(converted / "seed.jsonl")
    assert [r["id"] for r in seed] == ["101669", "101670"]     # the video question is left out
    assert seed[1]["question"] == "How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four"
    assert seed[1]["question_type"] == "Instance Counting" and seed[1]["image"].endswith("77_123.jpg")
    star = _lines(converted / "mmstar.jsonl")
    assert star[1]["answers"] == ["B"] and star[1]["question_type"] == "fine-grained perception"
    ocr = _lines(converted / "ocrbench.jsonl")
    assert ocr[1]["answers"] == ["x ^ { 2 }"] and ocr[1]["dataset"] == "HME100k"
    viz = _lines(converted / "vizwiz.jsonl")
    assert len(viz[0]["answers"]) == 10 and viz[0]["image_name"] == "VizWiz_val_00000000.jpg"
    assert _lines(converted / "vizwiz_test.jsonl")[0]["answers"] == []
    assert [r["answers"] for r in _lines(converted / "textvqa_test.jsonl")] == [[], []]


def test_missing_images_are_named(tmp_path):
    root = tmp_path / "r"
    args = make_releases(root)
    (root / "OCRBench_Images" / "HME100k" / "train_1.jpg").unlink()
    with pytest.raises(ConfigError, match=r"1 of 2 images .*HME100k/train_1.jpg.*--skip-missing"):
        convert("ocrbench", tmp_path / "o.jsonl", questions=[args["ocrbench"][2]], images=args["ocrbench"][4])
    assert convert("ocrbench", tmp_path / "o.jsonl", questions=[args["ocrbench"][2]], images=args["ocrbench"][4],
                   skip_missing=True) == 1
    with pytest.raises(ConfigError, match="is not a folder"):
        convert("seed", tmp_path / "s.jsonl", questions=[args["seed"][2]], images=str(tmp_path / "nowhere"))
    assert main(["convert", "vizwiz", "--questions", args["vizwiz"][2], "--images", str(root), "--out",
                 str(tmp_path / "v.jsonl")]) == 2   # the images are one folder down: a one-line error, status 2


def test_converted_files_run_on_the_embedded_model(converted, tmp_path, monkeypatch):
    from vtc.bench import plots
    from vtc.bench.runner import run

    monkeypatch.setattr(plots, "plot_run", lambda summaries, out_dir: [])   # plots are test_report's; 14 PNGs cost seconds

    tasks = [{"task": {"name": name, "loader": "jsonl", "split": "test", "metric": metric, "max_new_tokens": 2,
                       "prompt": "{question}" + suffix, "options": {"path": str(converted / f"{name}.jsonl")}}}
             for name, (metric, suffix) in TASKS.items()]
    cfg = {"name": "formats", "output": str(tmp_path / "run"), "batch_size": 8, "latency": False,
           "allow_absolute_paths": True,   # the converted files name the images where the releases keep them
           "models": [{"name": "tiny-llava", "source": "tiny", "path": "tiny-llava", "device": "cpu", "dtype": "float32"}],
           "tasks": tasks, "pipelines": [{"pipeline": "random:keep=16", "name": "random"}]}
    out = run(cfg, progress=False)
    summaries = {(s["task"], s["method"]): s for s in map(json.loads, (out / "summary.jsonl").read_text().splitlines())}
    for name in ("mmbench", "seed", "mmstar", "ocrbench", "vizwiz"):
        base, rand = summaries[(name, "baseline")], summaries[(name, "random")]
        assert base["score"] is not None and base["score_low"] <= base["score"] <= base["score_high"], name
        assert rand["reference"] == "baseline" and rand["p_value"] is not None and rand["errors"] == 0, name
    assert summaries[("mmbench", "baseline")]["scored"] == 7 and summaries[("mmbench", "baseline")]["n_paired"] is None
    assert summaries[("mmbench", "random")]["n_paired"] == 2   # CircularEval: two questions, seven passes
    for name, key in (("vizwiz_test", "image"), ("textvqa_test", "question_id")):
        s = summaries[(name, "baseline")]
        assert s["score"] is None and s["unanswered"] == s["answered"] > 0
        records = json.loads((out / s["submission"]).read_text())
        assert len(records) == s["answered"] and set(records[0]) == {key, "answer"}
    assert json.loads((out / summaries[("textvqa_test", "baseline")]["submission"]).read_text())[0]["question_id"] == 34602
    # rows keep what the metrics read; each cell records its own peak memory
    mm = summaries[("mmbench", "baseline")]
    mm_rows = [json.loads(x) for x in (out / "rows" / f"{mm['id']}.jsonl").read_text().splitlines()]
    assert {r["group"] for r in mm_rows} == {"1", "2"} and all(set(r["meta"]) == {"choices", "pass"} for r in mm_rows)
    ocr_rows = (out / "rows" / f"{summaries[('ocrbench', 'baseline')]['id']}.jsonl").read_text()
    assert '"meta":{"dataset":"HME100k"}' in ocr_rows
    meta = json.loads((out / "cells" / f"{mm['id']}.json").read_text())
    assert meta["memory"]["kind"].startswith("cpu_rss_growth") and mm["peak_mem_mib"] is not None
    md = (out / "report.md").read_text()
    assert "### tiny-llava / mmbench (mmbench)" in md and "submission files:" in md


def test_mmstar_parquet_release(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="reading the Hugging Face parquet release needs pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"index": [0, 1], "question": ["Q1?\nOptions: A: x, B: y", "Q2?\nOptions: A: x, B: y"],
                      "image": [{"bytes": _image((1, 2, 3)), "path": None}, {"bytes": _image((4, 5, 6)), "path": None}],
                      "answer": ["A", "B"], "category": ["math", "math"], "l2_category": ["geometry", "geometry"]})
    pq.write_table(table, tmp_path / "mmstar.parquet")
    assert convert("mmstar", tmp_path / "out" / "val.jsonl", questions=[str(tmp_path / "mmstar.parquet")]) == 2
    recs = _lines(tmp_path / "out" / "val.jsonl")
    assert [r["answers"] for r in recs] == [["A"], ["B"]] and (tmp_path / "out" / recs[1]["image"]).is_file()
