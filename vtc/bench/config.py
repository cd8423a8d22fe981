"""A bench config and the grid of cells it expands to (model x task x pipeline x budget).

::

    name: quick
    output: runs/quick            # relative to the working directory
    models: [...]                 # see vtc.bench.models
    tasks:                        # manifest paths (relative to this file) or mappings
      - ../tasks/easy_vqa.yaml
      - {task: ../tasks/pope.yaml, limit: 500, stratify: answer, models: [llava-7b]}   # models: only these
    pipelines:                    # "{budget}" is replaced by each budget
      - divprune:keep={budget}
      - {name: cls+tome, pipeline: "vtc-cls:keep=192 | tome:keep={budget}"}
      - {name: m3, pipeline: "m3:keep={budget}", budgets: [36, 144]}
      - {name: divprune-orig-pos, pipeline: "divprune:keep={budget}", apply: {position_ids: original}}
      - {pipeline: "mqt:keep={budget}", models: [tiny-mqt]}   # models: only on these models
    budgets: [64, 128, 192]
    baseline: true                # the uncompressed model, once per model x task (or a list of model names)
    batch_size: 8
    limit: 200                    # per task; null = all questions
    stratify: qtype               # qtype | answer | null
    seed: 0
    latency: {warmup: 1, repeats: 3, new_tokens: 8, batch: 1}   # or false
    plugins: [mypkg.metrics]      # modules to import first (THIS RUNS THEIR CODE; see vtc.bench.trust)
    allow_absolute_paths: false   # true: task image paths may leave the task file's folder

``batch_size``, ``limit`` and ``seed`` are validated here (whole numbers; ``batch_size`` and
``limit`` at least 1), like everything else, before any model loads.

Each cell has a hash over what determines its answers (model, task, pipeline, question
selection; not the batch size or the device), and its rows live in a file named after it, so a
changed config never resumes into stale rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtc.bench.latency import LatencyConfig
from vtc.bench.models import ModelEntry, model_entry
from vtc.bench.tasks import STRATA, Task, load_task
from vtc.bench.trust import TrustPolicy
from vtc.errors import ConfigError

__all__ = ["BenchConfig", "Cell", "PipelineSpec", "load_config", "BASELINE"]

BASELINE = "baseline"
_KEYS = {"name", "output", "models", "tasks", "pipelines", "budgets", "baseline", "batch_size", "limit", "stratify",
         "seed", "latency", "description", "plugins", "allow_absolute_paths"}


def _count(value: Any, what: str, *, minimum: int, none_ok: bool, fix: str) -> int | None:
    """``value`` as an int >= ``minimum`` (None when ``none_ok``), or a ConfigError naming ``what``."""
    if value is None and none_ok:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok or value < minimum:
        raise ConfigError(f"{what} must be a whole number >= {minimum}{' or null' if none_ok else ''}, got {value!r}; {fix}")
    return value


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(s)).strip("-") or "x"


def _substitute(obj: Any, budget: int | float | None) -> Any:
    if isinstance(obj, str):
        return obj.replace("{budget}", str(budget)) if budget is not None else obj
    if isinstance(obj, Mapping):
        return {k: _substitute(v, budget) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_substitute(v, budget) for v in obj]
    return obj


def _number(b: Any) -> int | float:
    """A budget: a token count, or a fraction for ``ratio={budget}`` templates."""
    try:
        f = float(b)
    except (TypeError, ValueError):
        raise ConfigError(f"budgets are numbers (token counts or ratios), got {b!r}") from None
    return int(f) if f.is_integer() else f


def _has_placeholder(obj: Any) -> bool:
    return "{budget}" in json.dumps(obj)


@dataclass
class PipelineSpec:
    """A pipeline template and the budgets it runs at (None: a fixed pipeline, one cell)."""

    name: str
    template: Any
    budgets: list[int | float] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of vtc.apply
    models: list[str] | None = None  # run only on these models (None: every model)

    @classmethod
    def parse(cls, entry: Any, budgets: list[int] | None) -> PipelineSpec:
        options: dict[str, Any] = {}
        models = None
        if isinstance(entry, str):
            template, name, own = entry, None, None
        elif isinstance(entry, Mapping):
            unknown = set(entry) - {"name", "pipeline", "budgets", "apply", "models"}
            if "pipeline" not in entry or unknown:
                raise ConfigError(
                    f"a pipelines entry is a string or {{name, pipeline, budgets, apply, models}}, got {dict(entry)!r}")
            template, name, own = entry["pipeline"], entry.get("name"), entry.get("budgets")
            options = dict(entry.get("apply") or {})
            models = entry.get("models")
        else:
            raise ConfigError(f"a pipelines entry is a string or a mapping, got {entry!r}")
        if name is None:
            from vtc.pipeline import parse_spec

            ops = parse_spec(template) if isinstance(template, str) else (
                [template] if isinstance(template, Mapping) else list(template))
            name = "+".join(str(o.get("op", "?")) for o in ops)
        if name == BASELINE:
            raise ConfigError(f"{BASELINE!r} is reserved for the uncompressed model; rename the pipeline")
        if models is not None:
            models = [models] if isinstance(models, str) else [str(m) for m in models]
        if not _has_placeholder(template):
            return cls(name=name, template=template, budgets=None, options=options, models=models)
        use = own if own is not None else budgets
        if not use:
            raise ConfigError(f"pipeline {name!r} has a {{budget}} placeholder but no budgets are given")
        return cls(name=name, template=template, budgets=[_number(b) for b in use], options=options, models=models)


@dataclass
class Cell:
    """One (model, task, method, budget) combination of the grid."""

    model: ModelEntry
    task: Task
    method: str
    budget: int | float | None
    pipeline_spec: Any  # None for the baseline
    selection: dict[str, Any] = field(default_factory=dict)
    apply_options: dict[str, Any] = field(default_factory=dict)

    def pipeline(self):
        """The built :class:`vtc.Pipeline` (None for the baseline)."""
        if self.pipeline_spec is None:
            return None
        import vtc

        return vtc.build(self.pipeline_spec)

    def spec(self) -> dict[str, Any]:
        pipe = self.pipeline()
        return {"model": self.model.spec(), "task": self.task.spec(), "method": self.method, "budget": self.budget,
                "pipeline": pipe.spec() if pipe is not None else None, "apply": self.apply_options,
                "selection": self.selection}

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method}@{self.budget}"

    @property
    def id(self) -> str:
        b = "" if self.budget is None else f"-{self.budget}"
        return f"{_safe(self.model.name)}__{_safe(self.task.name)}__{_safe(self.method)}{b}__{self.hash}"

    @property
    def is_baseline(self) -> bool:
        return self.pipeline_spec is None


@dataclass
class BenchConfig:
    """A parsed bench config (see the module docstring)."""

    name: str
    output: Path
    models: list[ModelEntry]
    tasks: list[tuple[Task, dict[str, Any]]]
    pipelines: list[PipelineSpec]
    baseline: bool | list[str] = True  # or the names of the models that get one
    task_models: dict[str, list[str]] = field(default_factory=dict)  # task name -> the only models it runs on
    batch_size: int = 8
    seed: int = 0
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    source: dict[str, Any] = field(default_factory=dict)
    trust: TrustPolicy = field(default_factory=TrustPolicy)  # what the user allowed (vtc.bench.trust)

    def cells(self) -> list[Cell]:
        """Every cell, grouped by model then task; the baseline first in each group."""
        out = []
        for model in self.models:
            for task, sel in self.tasks:
                if model.name not in self.task_models.get(task.name, [model.name]):
                    continue
                if self.baseline is True or (isinstance(self.baseline, list) and model.name in self.baseline):
                    out.append(Cell(model, task, BASELINE, None, None, sel))
                for p in self.pipelines:
                    if p.models is not None and model.name not in p.models:
                        continue
                    for b in (p.budgets or [None]):
                        out.append(Cell(model, task, p.name, b, _substitute(p.template, b), sel, p.options))
        ids = [c.id for c in out]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ConfigError(f"the grid holds the same cell twice ({sorted(dup)[0]}); give pipelines distinct names")
        for c in out:
            c.pipeline()  # unknown operators or bad arguments fail now, before anything runs
        return out


def load_config(source: str | Path | Mapping[str, Any], *, output: str | Path | None = None,
                limit: int | None = None, stratify: str | None = None, batch_size: int | None = None,
                latency: bool | None = None, plugins: Sequence[str] = (), trust_remote_code: bool = False,
                allow_absolute_paths: bool = False) -> BenchConfig:
    """Parse a bench config file (or mapping); keyword arguments override its values (the CLI flags).

    ``plugins``, ``trust_remote_code`` and ``allow_absolute_paths`` are the user's opt-ins of
    :mod:`vtc.bench.trust` (``--plugin``, ``--trust-remote-code``, ``--allow-absolute-paths``);
    the config's own ``plugins:`` modules are imported too, before any name is checked.
    Everything is validated here, before a model loads."""
    if isinstance(source, Mapping):
        data, base = dict(source), Path.cwd()
    else:
        from vtc.resources import config_path

        path = config_path(source)  # a file, or the name of a shipped config ("quick")
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"bench config {str(path)!r} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"bench config {str(path)!r} must be a mapping")
        base = path.parent.resolve()
        data.setdefault("name", path.stem)
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ConfigError(f"bench config has unknown key(s) {unknown}; valid keys: {sorted(_KEYS)}")
    for key in ("models", "tasks"):
        if not data.get(key):
            raise ConfigError(f"bench config needs a non-empty '{key}' list")
    name = str(data.get("name", "bench"))
    allow_paths = data.get("allow_absolute_paths", False)
    if not isinstance(allow_paths, bool):
        raise ConfigError(f"allow_absolute_paths must be true or false, got {allow_paths!r}")
    trust = TrustPolicy.build(cli_plugins=plugins, config_plugins=data.get("plugins"),
                              trust_remote_code=trust_remote_code, allow_absolute_paths=allow_absolute_paths or allow_paths)
    if data.get("plugins"):
        logging.getLogger("vtc.bench").warning(
            "vtc bench: the config imports plugin module(s) %s (this runs their code)", ", ".join(data["plugins"])
            if isinstance(data["plugins"], list) else data["plugins"])
    trust.import_plugins()  # plugins register metrics, operators, loaders and sources before names are checked
    # the CLI's --limit / --batch-size are named as flags, the config's keys as keys
    if limit is not None:
        limit = _count(limit, "--limit", minimum=1, none_ok=False, fix="it is the number of questions per task")
    g_limit = limit if limit is not None else _count(data.get("limit"), "limit", minimum=1, none_ok=True,
                                                     fix="it is the number of questions per task (null: all)")
    g_strat = stratify if stratify is not None else data.get("stratify")
    seed = _count(data.get("seed", 0), "seed", minimum=0, none_ok=False, fix="it seeds the stratified selection")
    if batch_size is not None:
        batch_size = _count(batch_size, "--batch-size", minimum=1, none_ok=False,
                            fix="it is the number of questions per generate call")
    else:
        batch_size = _count(data.get("batch_size", 8), "batch_size", minimum=1, none_ok=False,
                            fix="it is the number of questions per generate call")
    tasks = []
    task_models: dict[str, list[str]] = {}
    for t in data["tasks"]:
        only = None
        if isinstance(t, Mapping) and "task" in t:
            t = dict(t)
            src = t.pop("task")
            only = t.pop("models", None)
            t_limit = limit if limit is not None else t.pop("limit", g_limit)
            t_strat = stratify if stratify is not None else t.pop("stratify", g_strat)
            t.pop("limit", None), t.pop("stratify", None)
            t_limit = _count(t_limit, f"limit of task {src!r}", minimum=1, none_ok=True,
                             fix="it is the number of questions of this task (null: all)")
            task = load_task(src, base_dir=base, trust=trust, **t)
        else:
            task, t_limit, t_strat = load_task(t, base_dir=base, trust=trust), g_limit, g_strat
        if t_strat is not None and t_strat not in STRATA:
            raise ConfigError(f"stratify must be one of {STRATA} or null, got {t_strat!r}")
        tasks.append((task, {"limit": None if t_limit is None else int(t_limit), "stratify": t_strat, "seed": seed}))
        if only is not None:
            task_models[task.name] = [only] if isinstance(only, str) else [str(m) for m in only]
    names = [t.name for t, _ in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique in a config, got {names}")
    models = [model_entry(m, trust) for m in data["models"]]
    if len({m.name for m in models}) != len(models):
        raise ConfigError(f"model names must be unique in a config, got {[m.name for m in models]}")
    budgets = data.get("budgets")
    pipelines = [PipelineSpec.parse(p, budgets) for p in (data.get("pipelines") or [])]
    baseline = data.get("baseline", True)
    if isinstance(baseline, str):
        baseline = [baseline]
    known = {m.name for m in models}
    named = [*(baseline if isinstance(baseline, list) else []), *(n for ms in task_models.values() for n in ms),
             *(n for p in pipelines for n in (p.models or []))]
    missing = sorted(set(named) - known)
    if missing:
        raise ConfigError(f"the config names model(s) {missing} that are not in its models list {sorted(known)}")
    lat = LatencyConfig.from_config(data.get("latency", True))
    if latency is False:
        lat.enabled = False
    out = Path(output) if output is not None else Path(data.get("output") or f"runs/{_safe(name)}")
    return BenchConfig(
        name=name, output=out, models=models, tasks=tasks, pipelines=pipelines,
        baseline=[str(b) for b in baseline] if isinstance(baseline, list) else bool(baseline),
        task_models=task_models, batch_size=batch_size, seed=seed, latency=lat, source=data, trust=trust,
    )
