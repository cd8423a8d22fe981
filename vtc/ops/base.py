"""Base classes of vtc operators: what every operator is, and how budgets reach it.

An operator is a ``torch.nn.Module`` with a typed ``Config`` dataclass, a default ``stage``
(``"vision"``: on the tower's patch tokens before the projector; ``"llm"``: on the projector's
outputs; ``"llm_layer"``: inside the language model, after chosen decoder layers, see
:mod:`vtc.ops.llm_layer`), the signals it ``requires``, and ``forward(VisualTokens) -> VisualTokens``
(``llm_layer`` operators: ``forward(LayerContext) -> keep mask``). Operators only decide which
tokens survive (or how they merge); they never see input ids or masks.

:class:`Selector` is the base of every operator that reduces each image to ``k`` tokens (by
keeping or merging). It turns ``keep=``/``ratio=`` into a per-image ``k``, and when an allocator
has set per-partition ``budget``\\ s it runs once per (image, partition) row with that row's
budget. :class:`Allocator` is the base of operators that decide per-partition budgets (HiRED,
GlobalCom2); in a pipeline, an allocator followed by a selector only allocates.

An operator called on its own validates its input once (``Operator.__call__``; inside a Pipeline
the pipeline does it) and runs without further data checks; when every image holds all its tokens
a selector's budget is a host ``int``, so operators whose output count is fixed run without a host
sync (``tests/ops/test_dispatch_counts.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from vtc.errors import BudgetError, ConfigError, InputError, SignalError
from vtc.taps.layers import expand_layers
from vtc.tokens import VisualTokens, checking, inputs_checked

_MAX_KEEP = torch.iinfo(torch.long).max

Stage = Literal["vision", "llm", "llm_layer"]
#: The stages in the order a pipeline runs them: the tower's tokens, the projector's outputs, the
#: language model's decoder layers.
STAGES: tuple[str, ...] = ("vision", "llm", "llm_layer")


@dataclass
class OpConfig:
    """Arguments every operator takes. ``stage`` overrides the operator's default stage."""

    stage: Stage | None = None

    def __post_init__(self) -> None:
        if self.stage is not None and self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {self.stage!r}")


@dataclass
class SelectConfig(OpConfig):
    """Budget arguments: ``keep`` tokens per image, or a ``ratio`` of the tokens present.

    ``k = round(ratio * n)`` (at least 1) for an image holding ``n`` tokens; ``keep >= n`` keeps
    everything. With neither set, the budget must come from an allocator earlier in the pipeline.
    """

    keep: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep is not None and self.ratio is not None:
            raise BudgetError(f"give keep= or ratio=, not both (got keep={self.keep}, ratio={self.ratio})")
        if self.keep is not None and self.keep <= 0:
            raise BudgetError(f"keep must be a positive number of tokens, got keep={self.keep}")
        if self.ratio is not None and not (0.0 < self.ratio <= 1.0):
            raise BudgetError(f"ratio must be in (0, 1], got ratio={self.ratio}; use keep= for a token count")


def config_dict(config: Any, *, full: bool = True) -> dict[str, Any]:
    """A config dataclass as a plain dict (only non-default values unless ``full``)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, tuple):
            v = list(v)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if isinstance(default, tuple):
            default = list(default)
        if full or v != default:
            out[f.name] = v
    return out


class Operator(nn.Module):
    """Base of every registered operator (see the module docstring)."""

    name: ClassVar[str] = "operator"
    Config: ClassVar[type] = OpConfig
    default_stage: ClassVar[str] = "llm"
    #: true for operators that reduce tokens to a budget and so can fill an allocator's budgets
    selects: ClassVar[bool] = False
    #: true for operators that write per-partition budgets
    allocates: ClassVar[bool] = False
    #: true for trainable operators that map vision features straight to LLM embeddings (MQT):
    #: the integration then runs them instead of the model's projector
    replaces_projector: ClassVar[bool] = False
    #: LLaVA-NeXT only: where the integration puts ``image_newline`` tokens when this operator is in
    #: the pipeline and ``vtc.apply(..., newline="auto")``: None (no preference: LLaVA-NeXT's
    #: standard, one after each grid row that holds tokens), ``"none"`` (HiRED's official code),
    #: ``"all_rows"`` (GlobalCom²'s: one after every one of the nH*h grid rows) or
    #: ``"unpadded_rows"``. Subclasses may make it a property when it depends on their config.
    newline_policy: ClassVar[str | None] = None
    #: LLaVA-NeXT only, stage "llm": whether the operator sees each partition's tokens before the
    #: AnyRes assembly (``"partitions"``, M3) or the assembled sequence, newline tokens included
    #: (``"assembled"``, DivPrune's official code). None: no preference (partitions).
    anyres_view: ClassVar[str | None] = None
    #: LLaVA-NeXT only: whether the operator is given the crop tokens that LLaVA-NeXT's unpadding
    #: removes (the padding around a non-square image). False (default): when this operator runs
    #: first, the integration drops those tokens before it, so every token it keeps reaches the
    #: language model. True: grid pooling (m3, pool: M3 pools whole partitions before unpadding)
    #: and HiRED's official code, which ranks padding tokens too.
    sees_padding: ClassVar[bool] = False
    #: LLaVA-NeXT only: the :class:`~vtc.geometry.CropRules` (unpad rounding, crop tiling, crop
    #: placement) this operator decides with, when it depends on them (HiRED, GlobalCom²); None: no
    #: preference. ``vtc.apply`` unpads and assembles the whole pipeline with the rules its
    #: operators declare, so what an operator decides is what the language model receives.
    crop_rules: ClassVar[Any] = None

    def __init__(self, config: Any = None, /, **kwargs: Any) -> None:
        super().__init__()
        from vtc.registry import make_config

        if config is None:
            config = make_config(type(self), kwargs)
        elif kwargs:
            raise ConfigError(f"{self.name}: pass a Config or keyword arguments, not both")
        elif not isinstance(config, self.Config):
            raise ConfigError(f"{self.name}: config must be a {self.Config.__name__}, got {type(config).__name__}")
        in_llm = self.default_stage == "llm_layer"
        if config.stage is not None and (config.stage == "llm_layer") != in_llm:
            raise ConfigError(
                f"operator {self.name!r} cannot run at stage {config.stage!r}: "
                + ("it runs inside the language model (stage 'llm_layer')" if in_llm else
                   "stage 'llm_layer' is for operators that read the decoder's attention (fastv, pdrop, aim, "
                   "sparsevlm); use 'vision' or 'llm'")
            )
        self.config = config

    @property
    def stage(self) -> str:
        return self.config.stage or self.default_stage

    @property
    def requires(self) -> dict[str, list[int]]:
        """Signals this operator reads: ``{"cls_attn": [22]}``. Taps record only these."""
        return {}

    def spec(self) -> dict[str, Any]:
        """``{"op": name, **arguments}`` with every argument (round-trips through vtc.build)."""
        return {"op": self.name, **config_dict(self.config)}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in config_dict(self.config, full=False).items())

    def __call__(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the operator. Called on its own (not inside a Pipeline, which validates once for all
        its operators), it first validates ``tokens`` (:meth:`VisualTokens.validate`: features,
        required signals, sizes); an empty batch is returned as it is."""
        if isinstance(tokens, Tensor):
            raise InputError(
                f"operator {self.name!r} takes vtc.VisualTokens, got a bare tensor of shape {tuple(tokens.shape)}; "
                "wrap the features: vtc.VisualTokens(x=features) (add layout=, signals= as the operator needs)"
            )
        if isinstance(tokens, VisualTokens):
            if tokens.batch_size == 0 and not self.replaces_projector:
                return tokens
            if checking():
                tokens.validate(f"operator {self.name!r}", self.requires)
                with inputs_checked():
                    return super().__call__(tokens, *args, **kwargs)
        return super().__call__(tokens, *args, **kwargs)

    def check_signals(self, tokens: VisualTokens) -> None:
        """Raise a SignalError naming the first required signal that is missing."""
        where = f"operator {self.name!r}"
        for sig, layers in self.requires.items():
            for layer in expand_layers(tokens.layer_space, layers, f"{where}'s {sig!r} layers", SignalError):
                tokens.signal(sig, layer, op=where)

    def forward(self, tokens: VisualTokens) -> VisualTokens:  # pragma: no cover - abstract
        raise NotImplementedError


class Selector(Operator):
    """An operator that reduces each image, or each partition under a budget, to ``k`` tokens.

    Subclasses implement :meth:`select`; this class resolves ``k``, skips images that already
    fit, and runs per-partition rows when a budget is present. For a subclass with
    :attr:`int_budget`, when every image holds all its ``N`` tokens (no mask) and no budget is set,
    ``k`` is a host ``int`` and ``select`` is called only if ``k < N``: it then returns exactly ``k``
    tokens per image without a host sync.
    """

    Config: ClassVar[type] = SelectConfig
    selects: ClassVar[bool] = True
    #: whether :meth:`select` (and :meth:`resolve_keep`) accept an ``int`` budget (see the class
    #: docstring); a subclass that only handles ``[B]`` tensors leaves this False
    int_budget: ClassVar[bool] = False

    def forward(self, tokens: VisualTokens) -> VisualTokens:
        self.check_signals(tokens)
        if tokens.budget is not None:
            rows, G = tokens.split_groups()
            k = torch.minimum(rows.budget[:, 0], rows.counts)
            out = self._run(rows.replace(budget=None), k)
            return tokens.join_groups(out.replace(budget=None), G)
        if tokens.mask is None and self.int_budget:
            k = self.resolve_keep(tokens.num_tokens)
            return tokens if k >= tokens.num_tokens else self.select(tokens, k)
        return self._run(tokens, self.resolve_keep(tokens.counts))

    def _run(self, tokens: VisualTokens, k: Tensor) -> VisualTokens:
        fits = k >= tokens.counts
        if bool(fits.all()):
            return tokens
        out = self.select(tokens, k)
        # an image that already fits its budget is left as it is, also when it shares a batch with
        # images that do not (so a batch gives what each image gives alone)
        return _take_rows(tokens, out, fits) if bool(fits.any()) else out

    def own_budget_args(self) -> list[str]:
        """The arguments set on this operator that fix its own budget (an allocator's budgets would
        conflict with them)."""
        return [a for a in ("keep", "ratio") if getattr(self.config, a, None) is not None]

    def resolve_keep(self, counts: Tensor | int) -> Tensor | int:
        """Budget ``k`` from ``keep``/``ratio``, clamped to the tokens present: per image ``[B]`` for
        ``counts`` ``[B]``, or a host int for a host count."""
        cfg = self.config
        if cfg.keep is None and cfg.ratio is None:
            raise BudgetError(
                f"operator {self.name!r} has no budget: give keep= or ratio=, or put an allocator "
                f"(hired, globalcom2) before it in the pipeline"
            )
        if isinstance(counts, int):
            k = cfg.keep if cfg.keep is not None else max(1, round(counts * cfg.ratio))
            return min(k, counts)
        if cfg.keep is not None:
            return counts.clamp_max(min(cfg.keep, _MAX_KEEP))
        return torch.minimum(torch.round(counts.to(torch.float64) * cfg.ratio).long().clamp_min(1), counts)

    def select(self, tokens: VisualTokens, k: Tensor | int) -> VisualTokens:  # pragma: no cover - abstract
        """Reduce row ``b`` of ``tokens`` to ``k[b]`` tokens (``0 <= k[b] <= counts[b]``); an ``int``
        ``k`` (only when :attr:`int_budget`) means every row holds all its tokens and keeps exactly ``k``."""
        raise NotImplementedError


class Allocator(Operator):
    """An operator that writes per-partition budgets (``VisualTokens.budget``) and selects.

    :meth:`allocate` sets the budget; ``forward`` allocates and then selects with the method's
    own scoring. In a pipeline, an allocator followed by a selector only allocates and the
    selector fills the budgets.
    """

    allocates: ClassVar[bool] = True

    def allocate(self, tokens: VisualTokens) -> VisualTokens:  # pragma: no cover - abstract
        raise NotImplementedError


def _take_rows(a: VisualTokens, b: VisualTokens, use_a: Tensor) -> VisualTokens:
    """``b`` with the rows where ``use_a`` ``[B]`` is true taken from ``a`` (both left-packed).

    Signals present in only one of them are dropped; ``layout`` and ``budget`` come from ``b``.
    """
    W = int(torch.where(use_a, a.counts, b.counts).max().item())

    def fit(t: Tensor, fill: float | bool = 0) -> Tensor:
        t = t[:, :W]
        if t.shape[1] < W:
            t = torch.cat([t, t.new_full((t.shape[0], W - t.shape[1], *t.shape[2:]), fill)], 1)
        return t

    def pick(ta: Tensor, tb: Tensor, fill: float | bool = 0) -> Tensor:
        ta, tb = fit(ta, fill), fit(tb, fill)
        return torch.where(use_a.view(-1, *([1] * (ta.dim() - 1))), ta, tb.to(ta.dtype))

    def groups(t: VisualTokens) -> Tensor:
        return t.group if t.group is not None else torch.zeros_like(t.index)

    signals = {name: {l: pick(t, b.signals[name][l]) for l, t in per_layer.items() if l in b.signals[name]}
               for name, per_layer in a.signals.items() if name in b.signals}
    return VisualTokens(
        x=pick(a.x, b.x),
        mask=pick(a.valid, b.valid, False),
        index=pick(a.index, b.index),
        size=None if a.size is None and b.size is None else pick(a.sizes, b.sizes),
        group=None if a.group is None and b.group is None else pick(groups(a), groups(b)),
        layout=b.layout,
        signals=signals,
        budget=b.budget,
        layer_space=b.layer_space,
    )
