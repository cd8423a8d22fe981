"""Options of ``vtc.apply``: position ids after compaction, and LLaVA-NeXT assembly choices.

``position_ids``: ``"contiguous"`` renumbers the compacted sequence with no gaps (as DivPrune's
code does: HF recomputes positions over the shorter sequence); ``"original"`` keeps every surviving
token's original position id, gaps included, and decoding continues from the original length (as
FastV does). None (the default): the model family's default, ``"contiguous"`` for LLaVA and
LLaVA-NeXT, ``"original"`` for the M-RoPE models (Qwen VL), which support only that.

LLaVA-NeXT only:

- ``newline``: ``"auto"`` (the policy an operator in the pipeline declares in
  ``Operator.newline_policy``, else ``"rows"``), ``"rows"``, ``"unpadded_rows"``, ``"all_rows"``
  or ``"none"`` (see :mod:`vtc.integrations.anyres`).
- ``llm_view``: where stage-``llm`` operators see the tokens. ``"partitions"``: each image's
  partitions before the assembly (``group``/``layout`` set; M3 pools every partition this way);
  ``"assembled"``: the assembled sequence with its newline tokens (DivPrune's official code).
  ``"auto"``: the assembly happens right before the first llm-stage operator that declares
  ``anyres_view = "assembled"``, so ``"m3:keep=144 | divprune:keep=64"`` pools the partitions and
  DivPrune picks from the assembled sequence; with no such operator, after all of them. A
  selector that fills an allocator's per-partition budgets (``"hired | divprune"``) works on the
  partitions whatever view it declares (``"assembled"`` then raises), so the assembly after it
  keeps LLaVA-NeXT's row-major crop order and adds the allocator's newline tokens.
- ``unpad``: apply LLaVA-NeXT's unpadding (default True; False keeps the padded grid, as the
  ``spatial`` merge of FasterVLM / HiPrune / VisionZip does).
- ``padding``: whether the first operator sees the crop tokens that unpadding removes.
  ``"auto"``: only if it declares ``Operator.sees_padding`` (m3, pool, HiRED official), else they
  are dropped before it so every token it keeps reaches the language model; ``"keep"``;
  ``"drop"``. (Padding tokens an operator keeps are removed by the assembly in any case.)
- ``unpad_rounding``: the arithmetic of the unpad (``"transformers"``, ``"float32"``, ``"float64"``;
  :data:`vtc.geometry.UNPAD_ROUNDINGS`) or ``"auto"`` (default).

Which crop geometry reaches the language model. vtc assembles the LLaVA-NeXT sequence itself (the
model's own unpad never runs), so the unpad and the crop layout are part of the method being run:
the integration unpads and assembles every image with the :class:`~vtc.geometry.CropRules` the
pipeline's operators declare (``Operator.crop_rules``: HiRED's official code unpads in float32 and
tiles non-square crop grids transposed, GlobalCom²'s unpads in original LLaVA's float64 and places
crop tokens by rank), and with stock transformers' rules when no operator declares any. What an
operator decides is then exactly what the language model receives: a mismatch cannot happen
silently. Operators that declare different rules in one pipeline, or ``unpad_rounding=`` that
contradicts an operator's, raise a :class:`~vtc.errors.ConfigError` when ``vtc.apply`` attaches
(set the operator's own ``unpad_rounding=`` instead). The processor's placeholder count (stock
transformers' rounding) stays each image's room: on the rare sizes where another rounding keeps
a row more, a pipeline that prunes almost nothing gets an :class:`~vtc.errors.InputError`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from vtc.errors import ConfigError
from vtc.geometry import STOCK, UNPAD_ROUNDINGS, CropRules
from vtc.integrations.anyres import NEWLINE_POLICIES

__all__ = ["ApplyOptions", "POSITION_MODES", "LLM_VIEWS"]

POSITION_MODES = ("contiguous", "original")
LLM_VIEWS = ("auto", "partitions", "assembled")
PADDING_MODES = ("auto", "keep", "drop")


@dataclass(frozen=True)
class ApplyOptions:
    """Validated options of ``vtc.apply`` (see the module docstring)."""

    position_ids: str | None = None
    newline: str = "auto"
    llm_view: str = "auto"
    unpad: bool = True
    padding: str = "auto"
    unpad_rounding: str = "auto"

    def __post_init__(self) -> None:
        if self.unpad_rounding not in ("auto", *UNPAD_ROUNDINGS):
            raise ConfigError(f"unpad_rounding must be one of {('auto', *UNPAD_ROUNDINGS)}, got {self.unpad_rounding!r}")
        if self.padding not in PADDING_MODES:
            raise ConfigError(f"padding must be one of {PADDING_MODES}, got {self.padding!r}")
        if self.position_ids is not None and self.position_ids not in POSITION_MODES:
            raise ConfigError(f"position_ids must be one of {POSITION_MODES}, got {self.position_ids!r}")
        if self.newline not in ("auto", *NEWLINE_POLICIES):
            raise ConfigError(f"newline must be one of {('auto', *NEWLINE_POLICIES)}, got {self.newline!r}")
        if self.llm_view not in LLM_VIEWS:
            raise ConfigError(f"llm_view must be one of {LLM_VIEWS}, got {self.llm_view!r}")
        if not isinstance(self.unpad, bool):
            raise ConfigError(f"unpad must be True or False, got {self.unpad!r}")

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> ApplyOptions:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ConfigError(f"vtc.apply got unknown option(s) {', '.join(map(repr, unknown))}; valid: {', '.join(names)}")
        return cls(**options)

    def newline_policy(self, pipeline: Any) -> str:
        """The concrete newline policy for ``pipeline`` (resolving ``"auto"``)."""
        if self.newline != "auto":
            return self.newline
        declared = {}
        for op in pipeline:
            pol = getattr(op, "newline_policy", None)
            if pol is not None:
                if pol not in NEWLINE_POLICIES:
                    raise ConfigError(f"operator {op.name!r} declares newline_policy={pol!r}; use one of {NEWLINE_POLICIES}")
                declared[op.name] = pol
        if len(set(declared.values())) > 1:
            raise ConfigError(
                f"operators declare different LLaVA-NeXT newline policies {declared}; "
                "pass vtc.apply(..., newline=...) to choose one"
            )
        return next(iter(declared.values()), "rows")

    def crop_rules(self, pipeline: Any) -> CropRules:
        """The crop rules the integration unpads and assembles with (see the module docstring)."""
        declared = {op.name: op.crop_rules for op in pipeline if getattr(op, "crop_rules", None) is not None}
        if len(set(declared.values())) > 1:
            raise ConfigError(
                f"operators declare different LLaVA-NeXT crop rules {declared}; the integration assembles each "
                "image one way: give them the same unpad_rounding= (or run them in separate pipelines)")
        rules = next(iter(declared.values()), STOCK)
        if self.unpad_rounding != "auto" and self.unpad_rounding != rules.rounding:
            if declared:
                name = next(iter(declared))
                raise ConfigError(
                    f"vtc.apply(unpad_rounding={self.unpad_rounding!r}) but {name!r} decides with "
                    f"unpad_rounding={rules.rounding!r}, so the tokens it keeps would not be the ones the language "
                    f"model receives; pass '{name}:unpad_rounding={self.unpad_rounding}' (vtc.apply follows it)")
            rules = dataclasses.replace(rules, rounding=self.unpad_rounding)
        return rules

    def drops_padding(self, pipeline: Any, assemble_at: int) -> bool:
        """Whether LLaVA-NeXT's padding tokens are removed before the pipeline's first operator."""
        ops = list(pipeline)
        if not self.unpad or not ops or assemble_at == 0 or self.padding == "keep":
            return False  # no unpadding, nothing to run, or the assembly (which unpads) comes first
        return self.padding == "drop" or not getattr(ops[0], "sees_padding", False)

    def assembly_point(self, pipeline: Any) -> int:
        """Index into ``pipeline.ops`` before which the AnyRes assembly runs (``len(ops)``: after all).

        Only llm-stage operators sit after the assembly; vision-stage ones always see partitions.
        """
        ops = list(pipeline)
        llm = [i for i, op in enumerate(ops) if op.stage == "llm"]
        fills = [i for i in llm if i > 0 and pipeline.hands_off(i - 1)]  # selectors filling per-partition budgets
        if self.llm_view == "partitions" or not llm:
            return len(ops)
        if self.llm_view == "assembled":
            if fills:
                raise ConfigError(
                    f"{ops[fills[0]].name!r} fills the per-partition budgets of {ops[fills[0] - 1].name!r}, which "
                    "needs the partitions, not the assembled sequence (its newline tokens would take crop budget); "
                    "use llm_view='auto' or 'partitions'")
            return llm[0]
        first = next((i for i in llm if getattr(ops[i], "anyres_view", None) == "assembled" and i not in fills),
                     len(ops))
        for i in llm:
            if i > first and getattr(ops[i], "anyres_view", None) == "partitions":
                raise ConfigError(
                    f"operator {ops[i].name!r} works on AnyRes partitions but follows {ops[first].name!r}, which "
                    "works on the assembled sequence; reorder them or pass vtc.apply(..., llm_view='partitions')"
                )
        return first
