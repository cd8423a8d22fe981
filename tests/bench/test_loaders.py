"""vtc.bench.loaders: the JSONL format (paths, malformed records), easy-VQA, the loader registry."""

from pathlib import Path

import pytest
from conftest import write_jsonl_task

from vtc.bench.loaders import Question, get_loader, list_loaders, load_easy_vqa, load_jsonl, register_loader
from vtc.errors import ConfigError, InputError


def test_jsonl_records(tmp_path):
    write_jsonl_task(tmp_path, n=4)
    qs = list(load_jsonl("test", tmp_path, path="data.jsonl"))
    ids = [q.qid for q in qs]
    assert ids == ["q0", "q1", "q_broken", "q2", "line5", "q3", "q_noanswer"]
    q0 = qs[0]
    assert q0.question == "what is the color of the image?" and q0.answers == ["red"] * 3 + ["gray"] * 7
    assert q0.qtype == "color" and q0.error is None
    # image paths are relative to the JSONL file
    assert Path(q0.image) == tmp_path / "img" / "0.png"
    assert q0.load_image().size == (40, 32) and q0.load_image().mode == "RGB"
    # malformed records become questions carrying an error, not exceptions
    bad = {q.qid: q.error for q in qs if q.error}
    assert set(bad) == {"line5", "q_noanswer"}
    assert "invalid JSON" in bad["line5"] and "data.jsonl:5" in bad["line5"]
    assert "'answers'" in bad["q_noanswer"]
    # an unreadable image fails only when opened, with an InputError naming the question
    broken = qs[2]
    assert broken.error is None
    with pytest.raises(InputError, match="q_broken"):
        broken.load_image()


def test_jsonl_single_answer_and_image_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "val.jsonl").write_text('{"question_id": 7, "image": "a.png", "question": "q?", "answer": "yes"}\n\n')
    qs = list(load_jsonl("val", tmp_path, path="{split}.jsonl", image_root="imgs"))
    assert len(qs) == 1 and qs[0].qid == "7" and qs[0].answers == ["yes"] and qs[0].qtype is None
    assert qs[0].load_image().size == (8, 8)
    with pytest.raises(ConfigError, match="does not exist"):
        list(load_jsonl("test", tmp_path, path="missing.jsonl"))


def test_easy_vqa_loader():
    qs = list(load_easy_vqa("test"))
    assert len(qs) > 9000
    q = qs[0]
    assert q.qid == "test-0" and q.answers == ["triangle"] and q.qtype == "shape"
    assert {x.qtype for x in qs} == {"yes/no", "shape", "color"}
    assert all((x.qtype == "yes/no") == (x.answers[0] in ("yes", "no")) for x in qs)
    assert q.load_image().size == (64, 64)
    with pytest.raises(ConfigError, match="splits"):
        list(load_easy_vqa("val"))


def test_registry_and_import_path():
    assert {"easy_vqa", "jsonl"} <= set(list_loaders())

    @register_loader("_test_gen")
    def gen(split, base_dir=None, n=2):
        from PIL import Image

        for i in range(n):
            yield Question(qid=str(i), image=lambda: Image.new("RGB", (4, 4)), question="q", answers=["a"])

    qs = list(get_loader("_test_gen")("test", n=3))
    assert len(qs) == 3 and qs[0].load_image().size == (4, 4)  # generated images: a callable
    assert get_loader("vtc.bench.loaders:load_jsonl") is load_jsonl
    with pytest.raises(ConfigError, match="unknown question loader"):
        get_loader("nope")
    with pytest.raises(ConfigError, match="cannot import"):
        get_loader("vtc.bench.loaders:nope")
