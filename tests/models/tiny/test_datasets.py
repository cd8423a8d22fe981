"""tiny data sets: fixed, disjoint splits; easy-VQA read offline with its question types."""

import easy_vqa
import pytest

from vtc.errors import ConfigError
from vtc.models.tiny.datasets import SPLIT_SCENES, dataset
from vtc.models.tiny.vocab import EASY_VQA_ANSWERS, EASY_VQA_WORDS


def _spec(scene):
    return (scene.height, scene.width, scene.objects)


def test_splits_are_fixed_and_disjoint():
    ds = dataset("shapes")
    a = [(i.question, i.answer, i.key) for i in ds.items("val", limit=40)]
    assert a == [(i.question, i.answer, i.key) for i in ds.items("val", limit=40)]
    test = {_spec(ds.scene("test", i)) for i in range(SPLIT_SCENES["test"])}
    val = {_spec(ds.scene("val", i)) for i in range(SPLIT_SCENES["val"])}
    train = {_spec(ds.train_sample(i, 1)[0]) for i in range(3000)}
    assert len(test) == SPLIT_SCENES["test"] and not (test & train) and not (val & train) and not (val & test)
    large = dataset("shapes-large")
    assert _spec(large.scene("test", 0)) != _spec(ds.scene("test", 0))
    with pytest.raises(ConfigError):
        ds.items("dev")


def test_training_stream_is_a_function_of_the_index():
    ds = dataset("shapes-large")
    s1, q1 = ds.train_sample(123, 6)
    s2, q2 = ds.train_sample(123, 6)
    assert s1 == s2 and q1 == q2 and len(q1) == 6 and len({q.question for q in q1}) == 6


def test_easy_vqa_words_types_and_sizes():
    ds = dataset("easy-vqa")
    with open(easy_vqa.easy_vqa.path.join(easy_vqa.easy_vqa.BASE_PATH, "data/answers.txt")) as f:
        assert set(EASY_VQA_ANSWERS) == {a.strip() for a in f if a.strip()}
    for split, n_q, n_img in (("train", 38575, 4000), ("test", 9673, 1000)):
        qs, ans, _ = (easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions)()
        assert len(qs) == n_q and len(ds.image_ids(split)) == n_img
        words = {w for q in qs for w in q.replace("?", " ?").split()}
        assert words <= set(EASY_VQA_WORDS) and set(ans) <= set(EASY_VQA_ANSWERS)
    items = ds.items("test", limit=300)
    for it in items:
        if it.qtype == "attribute":
            assert it.answer in (("gray", "teal", "black", "yellow", "brown", "blue", "green", "red")
                                 if it.detail == "color" else ("circle", "rectangle", "triangle"))
        else:
            assert it.qtype == "exist" and it.answer in ("yes", "no")
            assert (it.detail == "negated") == (" not " in f" {it.question} ")
    assert items[0].image.size == (64, 64) and items[0].image.mode == "RGB"
    img, qas = ds.train_sample(5, 4)
    assert len(qas) == 4 and img.size == (64, 64)
