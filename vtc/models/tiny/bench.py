"""``vtc bench`` glue for the embedded models: the ``tiny`` model source and the ``tiny_scenes`` loader.

Model entries ``{source: tiny, path: tiny-llava}`` load an embedded model from ``assets/`` (or an
exported folder) with :func:`vtc.models.tiny.loading.load`; its prompt is LLaVA-1.5's
``"USER: <image>\\n{prompt} ASSISTANT:"`` (set ``chat:`` to that in the config). Task manifests
with ``loader: tiny_scenes`` read the fixed splits of the procedural data sets (``dataset: shapes``,
``shapes-large`` or ``easy-vqa``), one question per type per scene, with the question type
(``count``, ``exist``, ``attribute``, ``spatial``; easy-VQA's ``shape``/``color``/``yes/no``) as
``qtype`` so reports can break scores down by type.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vtc.bench.loaders import Question, register_loader
from vtc.bench.models import ModelEntry, register_source
from vtc.errors import ConfigError

__all__ = ["load_tiny_scenes", "tiny_source"]


@register_loader("tiny_scenes")
def load_tiny_scenes(split: str = "test", base_dir: Path | None = None, *, dataset: str = "shapes") -> Iterator[Question]:
    """Questions of a fixed split of an embedded model's data set (see the module docstring)."""
    from vtc.models.tiny.datasets import dataset as get_dataset

    for item in get_dataset(dataset).items(split):
        yield Question(qid=item.key, image=item.image, question=item.question, answers=[item.answer],
                       qtype=item.qtype, meta={"detail": item.detail, "dataset": item.dataset})


@register_source("tiny")
def tiny_source(entry: ModelEntry) -> tuple[Any, Any]:
    """``(model, processor)`` of the embedded model named by ``entry.path`` (``tiny-llava`` by default)."""
    from vtc.models.tiny.loading import load

    if entry.options:
        raise ConfigError(f"model {entry.name!r}: source 'tiny' takes no options, got {sorted(entry.options)}")
    loaded = load(entry.path or "tiny-llava")
    return loaded.model, loaded.processor
