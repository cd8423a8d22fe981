"""vtc.models.tiny.bench: the embedded models' loader and model source for ``vtc bench``."""

from __future__ import annotations

import itertools

import pytest

from vtc.bench.loaders import get_loader
from vtc.bench.models import ModelEntry, _source
from vtc.errors import ConfigError
from vtc.models.tiny.datasets import dataset


def test_tiny_scenes_loader_yields_the_fixed_split_with_question_types():
    qs = list(itertools.islice(get_loader("tiny_scenes")(split="val", dataset="shapes"), 8))
    items = dataset("shapes").items("val", limit=8)
    assert [q.qid for q in qs] == [it.key for it in items]
    assert [(q.question, q.answers, q.qtype) for q in qs] == [(it.question, [it.answer], it.qtype) for it in items]
    assert {q.qtype for q in qs} == {"count", "exist", "attribute", "spatial"}
    assert qs[0].load_image().size == items[0].image.size


def test_tiny_source_is_registered_lazily_and_names_a_missing_model(tmp_path):
    src = _source("tiny")
    with pytest.raises(ConfigError, match="no embedded model"):
        src(ModelEntry(name="t", source="tiny", path=str(tmp_path)))
    with pytest.raises(ConfigError, match="takes no options"):
        src(ModelEntry(name="t", source="tiny", path=str(tmp_path), options={"x": 1}))
