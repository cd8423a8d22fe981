"""Pipeline: an ordered list of operators, and ``build()`` from every config form.

``vtc.build`` accepts a name with arguments (``"divprune:keep=64"``), a pipe of them
(``"vtc-cls:keep=192 | tome:keep=64"``), a dict (``{"op": "divprune", "keep": 64}``), a list of
dicts, a path to a YAML file holding any of these (or ``{"pipeline": ...}``), or a Pipeline. All
forms give the same :class:`Pipeline`, whose :meth:`~Pipeline.spec` round-trips and whose
:attr:`~Pipeline.hash` is stable across processes.

Stages run in order: every ``vision`` operator comes before every ``llm`` operator, and every
``llm_layer`` operator (inside the language model) comes last. An allocator followed by a selector
only allocates; the selector then fills the per-partition budgets (the integration carries
``budget`` and ``group`` across the projector when they sit in different stages).

Calling a pipeline on :class:`VisualTokens` runs its ``vision`` and ``llm`` operators (the part
before the language model); its ``llm_layer`` operators run inside the decoder, where the
integration calls them with a :class:`~vtc.ops.llm_layer.LayerContext` at the layers
:meth:`Pipeline.layer_schedule` lists.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from vtc.errors import ConfigError
from vtc.ops.base import STAGES, Operator
from vtc.registry import create, get_op
from vtc.taps.layers import sorted_layers
from vtc.tokens import VisualTokens

__all__ = ["Pipeline", "build", "parse_spec"]


class Pipeline(nn.Module):
    """Operators applied in order; callable on :class:`VisualTokens` (see the module docstring)."""

    def __init__(self, ops: Iterable[Operator] = ()) -> None:
        super().__init__()
        ops = list(ops)
        for op in ops:
            if not isinstance(op, Operator):
                raise ConfigError(f"a Pipeline holds vtc operators, got {type(op).__name__}; "
                                  "use vtc.build(...) for names, dicts and strings")
        self.ops = nn.ModuleList(ops)
        self._check()

    def _check(self) -> None:
        latest = None  # the operator of the latest stage so far
        for op in self.ops:
            st = op.stage
            if latest is not None and STAGES.index(st) < STAGES.index(latest.stage):
                if st == "vision":
                    hint = "order vision-stage operators first (or set stage=llm on it)"
                else:
                    hint = "operators inside the language model (stage 'llm_layer') come after every other operator"
                raise ConfigError(
                    f"operator {op.name!r} runs at stage {st!r} after {latest.name!r} at stage {latest.stage!r}; {hint}"
                )
            if latest is None or STAGES.index(st) > STAGES.index(latest.stage):
                latest = op
        for i, op in enumerate(self.ops):
            fills = i > 0 and self.ops[i - 1].allocates and op.selects
            own = getattr(op, "own_budget_args", lambda: [])()
            if fills and own:
                raise ConfigError(
                    f"{op.name!r} follows the allocator {self.ops[i - 1].name!r}, which sets its budgets; "
                    f"drop {'/'.join(a + '=' for a in own)} from {op.name!r}"
                )

    # ------------------------------------------------------------------ running
    def hands_off(self, i: int) -> bool:
        """Whether operator ``i`` is an allocator whose budgets the next operator fills."""
        return bool(self.ops[i].allocates and i + 1 < len(self.ops) and self.ops[i + 1].selects)

    def forward(self, tokens: VisualTokens, stage: str | None = None) -> VisualTokens:
        """Run every operator before the language model (or only those of ``stage``) in order.

        ``llm_layer`` operators are skipped: they run inside the decoder (:meth:`layer_schedule`).
        """
        if stage is not None and stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {stage!r}")
        if stage == "llm_layer":
            raise ConfigError(
                "llm_layer operators run inside the language model on a LayerContext, not on VisualTokens; "
                "use pipeline.layer_schedule(num_layers) to find which run after each decoder layer"
            )
        for i, op in enumerate(self.ops):
            if (stage is not None and op.stage != stage) or op.stage == "llm_layer":
                continue
            tokens = op.allocate(tokens) if self.hands_off(i) else op(tokens)
        return tokens

    def stage_ops(self, stage: str) -> list[Operator]:
        return [op for op in self.ops if op.stage == stage]

    def layer_schedule(self, num_layers: int) -> dict[int, list[Operator]]:
        """``{decoder layer: [llm_layer operators that run after it, in pipeline order]}``.

        Layer numbers are resolved against ``num_layers`` (negative ones count from the end) and
        listed in increasing order; layers without an operator are absent.
        """
        out: dict[int, list[Operator]] = {}
        for op in self.stage_ops("llm_layer"):
            for layer in op.resolve_layers(num_layers):
                out.setdefault(layer, []).append(op)
        return dict(sorted(out.items()))

    def has_stage(self, stage: str) -> bool:
        return any(op.stage == stage for op in self.ops)

    @property
    def requires(self) -> dict[str, list[int]]:
        """Union of the operators' required signals: ``{"cls_attn": [16, ..., 22]}``."""
        out: dict[str, set[int]] = {}
        for op in self.ops:
            for sig, layers in op.requires.items():
                out.setdefault(sig, set()).update(layers)
        return {k: sorted_layers(v) for k, v in out.items()}

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self):
        return iter(self.ops)

    def __getitem__(self, i: int) -> Operator:
        return self.ops[i]

    # ------------------------------------------------------------------ config round trip
    def spec(self) -> list[dict[str, Any]]:
        """Every operator as ``{"op": name, **all arguments}``; ``vtc.build(p.spec())`` rebuilds it."""
        return [op.spec() for op in self.ops]

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump({"pipeline": self.spec()}, sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_yaml())

    @property
    def hash(self) -> str:
        """12 hex digits of SHA-256 over the canonical JSON of :meth:`spec` (stable across runs)."""
        blob = json.dumps(self.spec(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def __str__(self) -> str:
        """The compact string form (non-default arguments only): ``"vtc-cls:keep=192 | tome:keep=64"``."""
        from vtc.ops.base import config_dict

        parts = []
        for op in self.ops:
            args = config_dict(op.config, full=False)
            parts.append(op.name + (":" + ",".join(f"{k}={_fmt(v)}" for k, v in args.items()) if args else ""))
        return " | ".join(parts) if parts else "identity"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.spec() == other.spec()

    __hash__ = nn.Module.__hash__


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


# ---------------------------------------------------------------------- parsing
def _split_top(s: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_spec(text: str) -> list[dict[str, Any]]:
    """``"a:k=v,k2=v2 | b"`` to ``[{"op": "a", "k": "v", "k2": "v2"}, {"op": "b"}]`` (values as strings)."""
    out = []
    for part in _split_top(text, "|"):
        part = part.strip()
        if not part:
            raise ConfigError(f"empty operator in pipeline spec {text!r}")
        name, _, argstr = part.partition(":")
        entry: dict[str, Any] = {"op": name.strip()}
        if argstr.strip():
            for kv in _split_top(argstr, ","):
                key, eq, val = kv.partition("=")
                if not eq or not key.strip():
                    raise ConfigError(f"argument {kv.strip()!r} in {part!r} is not of the form name=value")
                entry[key.strip()] = val.strip()
        out.append(entry)
    return out


def _op_from_dict(d: Any) -> Operator:
    if isinstance(d, Operator):
        return d
    if isinstance(d, str):
        ops = [_op_from_dict(x) for x in parse_spec(d)]
        if len(ops) != 1:
            raise ConfigError(f"expected one operator, got the pipe {d!r}")
        return ops[0]
    if not isinstance(d, dict) or "op" not in d:
        raise ConfigError(f"each pipeline entry needs an 'op' key naming the operator, got {d!r}")
    args = {k: v for k, v in d.items() if k != "op"}
    get_op(d["op"])  # unknown name -> ConfigError listing the valid ones
    return create(d["op"], **args)


def build(spec: Any) -> Pipeline:
    """Build a :class:`Pipeline` from any accepted form (see the module docstring)."""
    if isinstance(spec, Pipeline):
        return spec
    if isinstance(spec, Operator):
        return Pipeline([spec])
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec.strip().lower().endswith((".yaml", ".yml"))):
        return build(_load_yaml(Path(spec)))
    if isinstance(spec, str):
        if not spec.strip() or spec.strip() == "identity":
            return Pipeline([])
        return Pipeline([_op_from_dict(d) for d in parse_spec(spec)])
    if isinstance(spec, dict):
        if "pipeline" in spec:
            if set(spec) - {"pipeline", "name"}:
                raise ConfigError(f"a pipeline file holds 'pipeline' (and optionally 'name'), got keys {sorted(spec)}")
            return build(spec["pipeline"])
        return Pipeline([_op_from_dict(spec)])
    if isinstance(spec, Sequence):
        ops: list[Operator] = []
        for item in spec:
            ops.extend(build(item).ops)
        return Pipeline(ops)
    if spec is None:
        return Pipeline([])
    raise ConfigError(
        f"cannot build a pipeline from {type(spec).__name__}; give a string like 'divprune:keep=64', "
        "a dict {'op': ..., ...}, a list of them, or a YAML file path"
    )


def _load_yaml(path: Path) -> Any:
    import yaml

    if not path.is_file():
        raise ConfigError(f"pipeline file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"pipeline file {str(path)!r} is not valid YAML: {e}") from e
    if data is None:
        raise ConfigError(f"pipeline file {str(path)!r} is empty")
    return data
