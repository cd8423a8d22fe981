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

Validation happens once, where tokens enter: :meth:`Pipeline.forward` (and
:meth:`Pipeline.check_input`) checks the features, the signals the operators need and ``size``
with one cheap pass and one host sync, then runs every operator without re-checking.
``Pipeline(..., validate=False)`` (or ``validate=False`` per call) skips even that, and the
operators' own structural checks: for callers that already passed the same kind of input through
once (``vtc.apply`` after its first call). An integration that interleaves its own steps (the
projector, LLaVA-NeXT's assembly) calls :meth:`check_input` once per stage and
:meth:`run_op` per operator.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vtc.errors import ConfigError, InputError
from vtc.ops.base import STAGES, Operator
from vtc.registry import create, get_op
from vtc.taps.layers import sorted_layers
from vtc.tokens import VisualTokens, inputs_checked

__all__ = ["Pipeline", "build", "parse_spec"]


class Pipeline(nn.Module):
    """Operators applied in order; callable on :class:`VisualTokens` (see the module docstring)."""

    def __init__(self, ops: Iterable[Operator] = (), *, validate: bool = True) -> None:
        super().__init__()
        #: whether :meth:`forward` validates its input (see the module docstring)
        self.validate = bool(validate)
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

    def _stage_arg(self, stage: str | None) -> None:
        if stage is not None and stage not in STAGES:
            raise ConfigError(f"stage must be one of {', '.join(map(repr, STAGES))} (or None for all), got {stage!r}")
        if stage == "llm_layer":
            raise ConfigError(
                "llm_layer operators run inside the language model on a LayerContext, not on VisualTokens; "
                "use pipeline.layer_schedule(num_layers) to find which run after each decoder layer"
            )

    def check_input(self, tokens: Any, stage: str | None = None) -> None:
        """Validate ``tokens`` entering this pipeline (or its operators of ``stage``): features, the
        signals those operators need, ``size`` and the layout (:meth:`VisualTokens.validate`)."""
        self._stage_arg(stage)
        if not isinstance(tokens, VisualTokens):
            what = (f"a bare tensor of shape {tuple(tokens.shape)}" if isinstance(tokens, Tensor)
                    else type(tokens).__name__)
            raise InputError(
                f"a pipeline runs on vtc.VisualTokens, got {what}; wrap the features: "
                "vtc.VisualTokens(x=features) (add layout=, signals= as the operators need)"
            )
        requires: dict[str, set[int]] = {}
        for op in self.ops:
            if (stage is None or op.stage == stage) and op.stage != "llm_layer":
                for sig, layers in op.requires.items():
                    requires.setdefault(sig, set()).update(layers)
        tokens.validate(f"pipeline '{self}'", {k: sorted(v, key=str) for k, v in requires.items()})

    def run_op(self, i: int, tokens: VisualTokens, *, fast: bool | None = None) -> VisualTokens:
        """Run operator ``i`` on tokens already checked by :meth:`check_input` (an allocator whose
        budgets the next operator fills only allocates). ``fast`` (default: ``not self.validate``)
        also skips the operator's structural checks."""
        op = self.ops[i]
        if tokens.batch_size == 0 and not op.replaces_projector:
            return tokens
        with inputs_checked(fast=not self.validate if fast is None else fast):
            return op.allocate(tokens) if self.hands_off(i) else op(tokens)

    def forward(self, tokens: VisualTokens, stage: str | None = None, *, validate: bool | None = None) -> VisualTokens:
        """Run every operator before the language model (or only those of ``stage``) in order;
        validate the input first unless ``validate`` (default: :attr:`validate`) is false.

        ``llm_layer`` operators are skipped: they run inside the decoder (:meth:`layer_schedule`).
        """
        validate = self.validate if validate is None else validate
        if validate:
            self.check_input(tokens, stage)
        else:
            self._stage_arg(stage)
        for i, op in enumerate(self.ops):
            if (stage is not None and op.stage != stage) or op.stage == "llm_layer":
                continue
            tokens = self.run_op(i, tokens, fast=not validate)
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
                if key.strip() in entry:
                    raise ConfigError(f"argument {key.strip()!r} is given twice in {part!r}; give each argument once")
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
    if not isinstance(d["op"], str):
        raise ConfigError(f"'op' names one operator as a string (e.g. 'divprune'), got {d['op']!r}")
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
        path = Path(spec).expanduser()
        key = path.resolve()
        stack = _LOADING.get()
        if key in stack:
            chain = " -> ".join(str(p) for p in (*stack, key))
            raise ConfigError(f"pipeline file {str(path)!r} includes itself ({chain}); a pipeline file must "
                              "list operators, or name other pipeline files without a cycle")
        token = _LOADING.set((*stack, key))
        try:
            return build(_load_yaml(path))
        finally:
            _LOADING.reset(token)
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
        for i, item in enumerate(spec):
            if item is None:
                raise ConfigError(f"pipeline entry {i} is empty (None); remove it or name an operator "
                                  "(in YAML, a bare '-' is an empty entry)")
            ops.extend(build(item).ops)
        return Pipeline(ops)
    if spec is None:
        return Pipeline([])
    raise ConfigError(
        f"cannot build a pipeline from {type(spec).__name__}; give a string like 'divprune:keep=64', "
        "a dict {'op': ..., ...}, a list of them, or a YAML file path"
    )


_LOADING: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("vtc_pipeline_files", default=())


def _load_yaml(path: Path) -> Any:
    from vtc.registry import yaml_load

    if not path.is_file():
        raise ConfigError(f"pipeline file {str(path)!r} does not exist")
    import yaml

    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"pipeline file {str(path)!r} is not valid YAML: {e}") from e
    if data is None:
        raise ConfigError(f"pipeline file {str(path)!r} is empty")
    return data
