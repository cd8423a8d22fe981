"""Benchmark tasks: a YAML manifest naming a loader, a split, a prompt template and a metric.

Example (eval/tasks/easy_vqa.yaml)::

    name: easy_vqa
    loader: easy_vqa            # or jsonl, tiny_scenes, package.module:function
    split: test
    prompt: "{question}\\nAnswer the question using a single word or phrase."
    metric: exact               # vqa | exact | yesno
    max_new_tokens: 4
    options: {}                 # keyword arguments of the loader (jsonl: path, image_root)

Paths inside ``options`` are relative to the manifest's folder. :func:`select` picks the
questions a run uses: all of them, the first ``limit``, or a deterministic stratified subset of
``limit`` questions (proportional to each question type's or answer's share, seeded).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtc.bench.loaders import Question, get_loader
from vtc.bench.metrics import get_metric
from vtc.bench.normalize import normalize_answer
from vtc.bench.trust import TrustPolicy
from vtc.errors import ConfigError

__all__ = ["Task", "load_task", "select", "STRATA"]

STRATA = ("qtype", "answer")
_KEYS = {"name", "loader", "split", "prompt", "metric", "max_new_tokens", "options", "description"}


@dataclass
class Task:
    """A benchmark task (see the module docstring)."""

    name: str
    loader: str
    split: str = "test"
    prompt: str = "{question}"
    metric: str = "vqa"
    max_new_tokens: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    base_dir: Path = field(default_factory=Path.cwd)
    description: str = ""
    #: image paths may leave the task file's folder (the run's --allow-absolute-paths; not part of the hash)
    allow_absolute_paths: bool = False

    def __post_init__(self) -> None:
        if "{question}" not in self.prompt:
            raise ConfigError(f"task {self.name!r}: the prompt template must contain '{{question}}', got {self.prompt!r}")
        get_metric(self.metric)  # unknown metric -> ConfigError now, not after the run
        if int(self.max_new_tokens) < 1:
            raise ConfigError(f"task {self.name!r}: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def questions(self) -> list[Question]:
        """Every question of the task's split, in the loader's order."""
        fn = get_loader(self.loader)
        if "allow_absolute_paths" in self.options:
            raise ConfigError(f"task {self.name!r}: allow_absolute_paths is the user's decision, not the task's: pass "
                              "--allow-absolute-paths or set it in the bench config, and remove it from the options")
        options = dict(self.options)
        if _accepts(fn, "allow_absolute_paths"):
            options["allow_absolute_paths"] = self.allow_absolute_paths
        try:
            out = list(fn(split=self.split, base_dir=self.base_dir, **options))
        except TypeError as e:
            raise ConfigError(f"task {self.name!r}: loader {self.loader!r} rejected options {self.options!r}: {e}") from e
        seen: set[str] = set()
        for q in out:
            if q.qid in seen:
                raise ConfigError(f"task {self.name!r}: question id {q.qid!r} appears twice; ids must be unique")
            seen.add(q.qid)
        return out

    def format_prompt(self, question: str) -> str:
        return self.prompt.replace("{question}", question)

    def spec(self) -> dict[str, Any]:
        """What defines the task's results (for the cell hash): everything but its folder."""
        return {"name": self.name, "loader": self.loader, "split": self.split, "prompt": self.prompt,
                "metric": self.metric, "max_new_tokens": int(self.max_new_tokens), "options": self.options}

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:12]


def _accepts(fn: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def load_task(source: str | Path | Mapping[str, Any], base_dir: Path | None = None, *, trust: TrustPolicy | None = None,
              **overrides: Any) -> Task:
    """A Task from a manifest path or dict (``overrides`` replace manifest keys).

    ``trust`` (:class:`~vtc.bench.trust.TrustPolicy`, default: nothing beyond vtc's built-ins)
    decides whether a ``package.module:function`` loader may be used and whether image paths may
    leave the task file's folder."""
    trust = trust or TrustPolicy()
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_absolute() and base_dir is not None and not path.is_file():
            path = base_dir / path
        if not path.is_file():
            raise ConfigError(f"task manifest {str(source)!r} does not exist")
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"task manifest {str(path)!r} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"task manifest {str(path)!r} must be a mapping with loader, split, prompt, metric")
        base = path.parent.resolve()
        data.setdefault("name", path.stem)
    elif isinstance(source, Mapping):
        data, base = dict(source), (base_dir or Path.cwd())
    else:
        raise ConfigError(f"a task is a manifest path or a mapping, got {type(source).__name__}")
    data.update(overrides)
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ConfigError(f"task manifest has unknown key(s) {unknown}; valid keys: {sorted(_KEYS)}")
    if "loader" not in data:
        raise ConfigError("task manifest needs 'loader' (easy_vqa, jsonl, tiny_scenes or package.module:function)")
    trust.check_function("loader", str(data["loader"]), f"task {data.get('name', '?')!r}")
    return Task(**data, base_dir=Path(base), allow_absolute_paths=trust.allow_absolute_paths)


def _stratum(q: Question, by: str) -> str:
    if by == "qtype":
        return q.qtype or "?"
    return normalize_answer(q.answers[0]) if q.answers else "?"


def select(questions: Sequence[Question], limit: int | None = None, stratify: str | None = None,
           seed: int = 0) -> list[Question]:
    """The questions a run uses (deterministic for the same inputs).

    ``limit`` alone keeps the first ``limit``. With ``stratify`` (``"qtype"`` or ``"answer"``) it
    keeps ``limit`` questions split across strata in proportion to their size (largest remainder,
    ties to the larger stratum, then the name), each stratum sampled with a seeded shuffle; the
    result stays in the original order.
    """
    qs = list(questions)
    if limit is None or limit >= len(qs):
        return qs
    if limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    if stratify is None:
        return qs[:limit]
    if stratify not in STRATA:
        raise ConfigError(f"stratify must be one of {STRATA}, got {stratify!r}")
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(qs):
        groups.setdefault(_stratum(q, stratify), []).append(i)
    total = len(qs)
    quota = {k: limit * len(v) // total for k, v in groups.items()}
    rest = limit - sum(quota.values())
    by_remainder = sorted(groups, key=lambda k: (-(limit * len(groups[k]) % total), -len(groups[k]), k))
    for k in by_remainder[:rest]:
        quota[k] += 1
    chosen: list[int] = []
    for k in sorted(groups):
        idx = list(groups[k])
        random.Random(f"{seed}:{stratify}:{k}").shuffle(idx)
        chosen.extend(idx[: quota[k]])
    return [qs[i] for i in sorted(chosen)]
