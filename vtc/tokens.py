"""VisualTokens: the batched container every operator reads and returns.

One image's visual tokens travel from stage to stage as rows of a ``[B, N, D]`` tensor plus the
facts an operator needs to decide what to keep: the original position of each token (``index``),
how many patches a merged token stands for (``size``), which AnyRes partition it came from
(``group``), the grid it was cut from (``layout``, a :class:`vtc.geometry.Layout`), per-token
signals recorded in the vision tower (``signals``) and per-partition budgets set by an allocating
operator (``budget``).

Images in a batch may hold different numbers of tokens. Valid tokens are always packed to the
left of each row and ``mask`` marks them (``None`` means every token is valid). The helpers here
(:meth:`VisualTokens.gather`, :meth:`~VisualTokens.keep_mask`, :meth:`~VisualTokens.merge`,
:meth:`~VisualTokens.split_groups`, ...) keep every field and every signal aligned, so operators
never index fields by hand.

Checks cost device time (a host sync each on a GPU), so they happen where tokens enter:
constructing ``VisualTokens`` checks shapes and dtypes (and packs a mask), :meth:`VisualTokens.validate`
checks the data (finite features and signals, positive sizes) with one min/max pass and one sync,
and a pipeline or an operator called on its own runs it once, then its operators inside
:func:`inputs_checked`, where the helpers skip their own data checks. Operators and integrations
build their outputs with :meth:`VisualTokens.unchecked`. ``size`` is kept in float32 (float64 for
float64 features) whatever the features' dtype.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vtc.errors import InputError, LayoutError
from vtc.geometry import Layout

__all__ = ["Layout", "VisualTokens", "SIGNAL_MERGE_RULES", "inputs_checked", "checking", "checking_structure"]

#: 0: check everything (the default); 1: the data were validated where they entered (skip data
#: checks, keep structural ones); 2: fast mode (skip every check)
_CHECKED: contextvars.ContextVar[int] = contextvars.ContextVar("vtc_inputs_checked", default=0)


@contextmanager
def inputs_checked(fast: bool = False) -> Iterator[None]:
    """Run a block whose tokens were validated where they entered (:meth:`VisualTokens.validate`).

    A :class:`~vtc.pipeline.Pipeline` (or an operator called on its own) checks its input once and
    runs its operators inside this block; there :meth:`VisualTokens.check_finite` and the other
    data checks of the helpers (each a host sync on a GPU) are skipped. ``fast=True`` (a pipeline's
    ``validate=False`` mode) also skips the operators' structural checks (e.g. that an allocator
    sees complete partitions), which a first validated call has already passed.
    """
    token = _CHECKED.set(2 if fast else max(1, _CHECKED.get()))
    try:
        yield
    finally:
        _CHECKED.reset(token)


def checking() -> bool:
    """Whether data checks should run (false inside :func:`inputs_checked`)."""
    return _CHECKED.get() == 0


def checking_structure() -> bool:
    """Whether operators' structural checks should run (false only in fast mode)."""
    return _CHECKED.get() < 2


def size_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``size`` is kept in: float64 for float64 features, else float32 (sizes are patch
    counts; bf16 cannot hold 289)."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32

#: How a signal is combined when tokens are merged. Attention mass is additive (a merged token
#: receives the attention of all its members); everything else is a size-weighted mean.
SIGNAL_MERGE_RULES: dict[str, str] = {"cls_attn": "sum", "attn_received": "sum"}
_MERGE_RULES = ("sum", "mean", "min", "max")


def _as_layouts(layout: Any, batch: int) -> tuple[Layout, ...] | Layout | None:
    if layout is None or isinstance(layout, Layout):
        return layout
    if isinstance(layout, (list, tuple)) and all(isinstance(v, Layout) for v in layout):
        if len(layout) != batch:
            raise LayoutError(f"got {len(layout)} layouts for a batch of {batch} images; pass one per image or one for all")
        return tuple(layout)
    raise LayoutError(f"layout must be a vtc.Layout, a list of one per image, or None; got {type(layout).__name__}")


@dataclass
class VisualTokens:
    """A batch of visual tokens and everything aligned with them (see the module docstring).

    Only ``x`` is required: ``VisualTokens(x=features)`` gives ``index = arange(N)``, no mask,
    size 1, one partition, no signals and no budget.
    """

    x: Tensor
    mask: Tensor | None = None
    index: Tensor | None = None
    size: Tensor | None = None
    group: Tensor | None = None
    layout: Layout | tuple[Layout, ...] | None = None
    signals: dict[str, dict[int, Tensor]] = field(default_factory=dict)
    budget: Tensor | None = None
    #: the tower's layers (a :class:`vtc.taps.LayerSpace`), set by the tap: lets :meth:`signal` take
    #: negative layers and ``"feature"`` / ``"last"``
    layer_space: Any = None

    # ------------------------------------------------------------------ construction / checks
    def __post_init__(self) -> None:
        self._normalise(pack=True, check_budget=True)

    def _normalise(self, *, pack: bool, check_budget: bool, fields: Sequence[str] | None = None) -> None:
        """Check and normalise the fields named in ``fields`` (all by default); ``pack``: move padding
        right (a host sync when a mask is set), ``check_budget``: reject negative budgets (one too)."""
        todo = set(fields) if fields is not None else None

        def want(name: str) -> bool:
            return todo is None or name in todo

        x = self.x
        if not isinstance(x, Tensor):
            raise InputError(f"VisualTokens.x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 2:
            x = x.unsqueeze(0)
            self.x = x
        if x.dim() != 3 or not x.is_floating_point():
            raise InputError(f"VisualTokens.x must be a floating [B, N, D] tensor, got {x.dtype} of shape {tuple(x.shape)}")
        B, N = x.shape[:2]
        dev = x.device
        if self.index is None:
            self.index = _raster_index(B, N, dev)
        if want("index") or want("x"):
            self.index = self._check_field("index", self.index, (B, N), integral=True)
        if self.mask is not None and (want("mask") or want("x")):
            self.mask = self._check_field("mask", self.mask, (B, N), boolean=True)
        if self.size is not None and (want("size") or want("x")):
            self.size = self._check_field("size", self.size, (B, N))
            sd = size_dtype(x.dtype)
            if not self.size.is_floating_point() or torch.finfo(self.size.dtype).bits < torch.finfo(sd).bits:
                self.size = self.size.to(sd)
        if self.group is not None and (want("group") or want("x")):
            self.group = self._check_field("group", self.group, (B, N), integral=True)
        if want("layout") or want("x"):
            self.layout = _as_layouts(self.layout, B)
        if want("signals") or want("x"):
            sig: dict[str, dict[int, Tensor]] = {}
            for name, per_layer in (self.signals or {}).items():
                if not isinstance(per_layer, Mapping):
                    raise InputError(
                        f"signals[{name!r}] must map a layer number to a tensor, e.g. {{22: t}}, not be a "
                        f"{type(per_layer).__name__}"
                    )
                sig[name] = {int(l): self._check_field(f"signals[{name!r}][{l}]", t, (B, N), trailing=True)
                             for l, t in per_layer.items()}
            self.signals = sig
        if self.budget is not None and (want("budget") or want("x")):
            b = self.budget
            if not isinstance(b, Tensor):
                b = torch.as_tensor(b, device=dev)
            if b.dim() == 1:
                b = b.unsqueeze(1)
            if b.dim() != 2 or b.shape[0] != B or b.is_floating_point():
                raise InputError(f"budget must be an integer [B, G] tensor with B={B}, got shape {tuple(b.shape)}")
            if check_budget and b.numel() and bool((b < 0).any()):
                raise InputError("budget holds negative counts; a partition's budget is a count of tokens >= 0")
            self.budget = b.to(device=dev, dtype=torch.long)
        if pack and self.mask is not None:
            self._pack_left()

    @classmethod
    def unchecked(cls, x: Tensor, mask: Tensor | None = None, index: Tensor | None = None,
                  size: Tensor | None = None, group: Tensor | None = None, layout: Any = None,
                  signals: dict[str, dict[int, Tensor]] | None = None, budget: Tensor | None = None,
                  layer_space: Any = None) -> VisualTokens:
        """Build without any check (no host sync, almost no host time): for operators and integrations
        whose fields are already well-formed (``[B, N, D]`` features, left-packed bool mask, long
        ``index``/``group``, ``size`` in :func:`size_dtype`, a ``Layout`` or tuple of one per image,
        ``[B, G]`` long budget)."""
        obj = cls.__new__(cls)
        obj.x = x
        obj.mask = mask
        obj.index = _raster_index(x.shape[0], x.shape[1], x.device) if index is None else index
        obj.size = size
        obj.group = group
        obj.layout = layout
        obj.signals = {} if signals is None else signals
        obj.budget = budget
        obj.layer_space = layer_space
        return obj

    @staticmethod
    def _check_field(name: str, t: Any, shape: tuple[int, int], *, integral: bool = False,
                     boolean: bool = False, trailing: bool = False) -> Tensor:
        if not isinstance(t, Tensor):
            raise InputError(f"VisualTokens.{name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape[:2]) != shape or (not trailing and t.dim() != 2):
            want = f"[{shape[0]}, {shape[1]}{', ...' if trailing else ''}]"
            raise InputError(f"VisualTokens.{name} has shape {tuple(t.shape)} but must be {want} to align with x")
        if boolean and t.dtype != torch.bool:
            raise InputError(f"VisualTokens.{name} must be a bool tensor, got {t.dtype}")
        if integral and (t.is_floating_point() or t.dtype == torch.bool):
            raise InputError(f"VisualTokens.{name} must be an integer tensor, got {t.dtype}")
        return t.long() if integral else t

    def _pack_left(self) -> None:
        """Move padding to the right of each row (valid tokens keep their relative order)."""
        m = self.mask
        n = m.sum(1, keepdim=True)
        if bool((m == (torch.arange(m.shape[1], device=m.device) < n)).all()):
            if bool(m.all()):
                self.mask = None
            return
        packed = self.keep_mask(m)
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(packed, f.name))

    def validate(self, where: str = "operator", signals: Mapping[str, Sequence[int]] | None = None) -> None:
        """Check the data once, where tokens enter a pipeline or an operator: the valid tokens'
        features and the ``signals`` named (``{name: [layers]}``; default every signal) are finite
        and ``size`` is finite and positive. Raise :class:`InputError` naming the first bad token.
        (Whether tokens fit their ``layout`` is checked by the geometry helpers that read it:
        :meth:`grid_position`, :meth:`check_layout`.)

        Cost: one min/max pass over each checked tensor, one host sync; the detailed (slower) scan runs
        only when that pass finds something."""
        if self.x.numel() == 0:
            return
        flags = self._check_flags(signals)
        if flags and not bool(torch.stack(flags).all()):
            self._diagnose(where, signals)

    def _checked_signals(self, signals: Mapping[str, Sequence[Any]] | None) -> list[tuple[str, int, Tensor]]:
        """``(name, layer, tensor)`` of the recorded signals named in ``signals`` (layers as operators
        give them: resolved with :attr:`layer_space`; those not recorded are left to :meth:`signal`)."""
        out = []
        for name, per_layer in self.signals.items():
            if signals is None:
                layers = list(per_layer)
            else:
                layers = []
                for l in signals.get(name, ()):
                    found = [l]
                    if l not in per_layer and self.layer_space is not None:
                        try:
                            found = self.layer_space.expand(l, where="validation")  # a span names several
                        except Exception:  # noqa: BLE001 - an unknown layer is reported by signal()
                            continue
                    layers.extend(f for f in found if f in per_layer and f not in layers)
            out.extend((name, l, per_layer[l]) for l in layers)
        return out

    def _check_flags(self, signals: Mapping[str, Sequence[int]] | None) -> list[Tensor]:
        """0-dim bool tensors, all true when the data passes (no sync here)."""
        flags = []
        for t in [self.x] + [s for _, _, s in self._checked_signals(signals)]:
            if t.numel() and t.is_floating_point():
                lo, hi = torch.aminmax(t)
                flags.append(torch.isfinite(lo) & torch.isfinite(hi))
        if self.size is not None:
            s = self.size if self.mask is None else self.size.masked_fill(~self.mask, 1)
            lo, hi = torch.aminmax(s)
            flags.append((lo > 0) & (hi < math.inf))
        return flags

    def _diagnose(self, where: str, signals: Mapping[str, Sequence[int]] | None) -> None:
        """The detailed scan behind :meth:`validate`: raise naming the first bad token (padding is ignored)."""
        valid = self.valid

        def first(bad: Tensor) -> tuple[int, int, int] | None:
            bad = bad & valid
            if not bool(bad.any()):
                return None
            b, n = (int(v) for v in bad.nonzero()[0])
            return b, n, int(bad.sum())

        hit = first(~torch.isfinite(self.x).all(-1))
        if hit:
            raise InputError(
                f"{where}: features hold NaN/Inf (first at image {hit[0]}, token {hit[1]}, {hit[2]} tokens in all); "
                "check the vision tower's dtype (fp16 overflow) and its inputs"
            )
        for name, layer, s in self._checked_signals(signals):
            if not s.is_floating_point():
                continue
            hit = first(~torch.isfinite(s).reshape(*s.shape[:2], -1).all(-1))
            if hit:
                raise InputError(
                    f"{where}: signals[{name!r}][{layer}] holds NaN/Inf (first at image {hit[0]}, token {hit[1]}, "
                    f"{hit[2]} tokens in all); check the vision tower's dtype (fp16 overflow) and the tap that recorded it"
                )
        if self.size is not None:
            hit = first(~(torch.isfinite(self.size) & (self.size > 0)))
            if hit:
                v = float(self.size[hit[0], hit[1]])
                raise InputError(
                    f"{where}: size must be a finite count > 0 of the patches each token stands for, but it is {v} "
                    f"at image {hit[0]}, token {hit[1]} ({hit[2]} tokens in all); leave size=None for unmerged tokens"
                )

    def check_finite(self, op: str = "operator", signals: Mapping[str, Sequence[int]] | None = None) -> None:
        """:meth:`validate` unless the caller already validated these tokens (:func:`inputs_checked`)."""
        if checking():
            self.validate(op, signals)

    @property
    def raster(self) -> bool:
        """Whether ``index`` is known, on the host, to be ``0..N-1`` in every row (it was left to its
        default): the tokens are in their original order. False means unknown."""
        return getattr(self.index, "_vtc_raster", False)

    # ------------------------------------------------------------------ basic facts
    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def num_tokens(self) -> int:
        """Padded token count N (the per-image counts are :attr:`counts`)."""
        return self.x.shape[1]

    @property
    def dim(self) -> int:
        return self.x.shape[2]

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def valid(self) -> Tensor:
        """``[B, N]`` bool: the mask, or all true."""
        if self.mask is None:
            return torch.ones(self.x.shape[:2], dtype=torch.bool, device=self.device)
        return self.mask

    @property
    def counts(self) -> Tensor:
        """``[B]`` long: valid tokens per image."""
        if self.mask is None:
            return torch.full((self.batch_size,), self.num_tokens, dtype=torch.long, device=self.device)
        return self.mask.sum(1)

    @property
    def sizes(self) -> Tensor:
        """``[B, N]``: :attr:`size`, or ones (in :func:`size_dtype`)."""
        if self.size is None:
            return torch.ones(self.x.shape[:2], dtype=size_dtype(self.x.dtype), device=self.device)
        return self.size

    @property
    def num_groups(self) -> int:
        """Number of partitions G (from ``budget``, else ``group``, else ``layout``, else 1)."""
        if self.budget is not None:
            return self.budget.shape[1]
        g = 1
        if self.group is not None and self.group.numel():
            g = int(self.group[self.valid].max().item()) + 1 if bool(self.valid.any()) else 1
        for lay in self.layouts():
            if lay is not None:
                g = max(g, lay.num_partitions)
        return g

    def layouts(self) -> list[Layout | None]:
        """One layout (or None) per image."""
        if isinstance(self.layout, tuple):
            return list(self.layout)
        return [self.layout] * self.batch_size

    def signal(self, name: str, layer: int | str, op: str = "operator") -> Tensor:
        """The recorded signal ``name`` at ``layer``, or a :class:`SignalError` saying how to get it.

        ``layer`` is a layer number as recorded, or a negative number, ``"feature"`` or ``"last"``,
        resolved with :attr:`layer_space` (the tower's, set by the tap that recorded the signals).
        """
        from vtc.errors import SignalError

        per_layer = self.signals.get(name) or {}
        key = layer
        if layer not in per_layer:
            if self.layer_space is not None:
                key = self.layer_space.resolve(layer, where=f"{op}'s {name!r} layers", error=SignalError)
            elif isinstance(layer, str) or (isinstance(layer, int) and layer < 0):
                raise SignalError(
                    f"{op} asks for signal {name!r} at vision layer {layer!r}, which is relative to the tower's "
                    "depth, but these tokens carry no layer_space. Build them with vtc.taps.to_tokens(features, tap), "
                    "or pass VisualTokens(..., layer_space=tap.layer_space) (or vtc.taps.LayerSpace(num_layers, "
                    "feature_layer))."
                )
        if key not in per_layer:
            have = {k: sorted(v) for k, v in self.signals.items()} or "none"
            at = repr(layer) if key == layer else f"{layer!r} (= layer {key})"
            raise SignalError(
                f"{op} needs signal {name!r} at vision layer {at} but it was not recorded (recorded: {have}). "
                f"Attach a tap that records it (vtc.taps.attach(tower, {{{name!r}: [{layer!r}]}})), "
                f"let vtc.apply do it, or pass it in VisualTokens.signals[{name!r}][{key!r}]."
            )
        return per_layer[key]

    def replace(self, **changes: Any) -> VisualTokens:
        """A copy with ``changes``; only the changed fields are checked (inside :func:`inputs_checked`:
        none), so ``replace(budget=None)`` costs no device work."""
        out = VisualTokens.unchecked(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        for k, v in changes.items():
            if k not in _FIELDS:
                raise InputError(f"VisualTokens has no field {k!r}; fields: {', '.join(_FIELDS)}")
            setattr(out, k, v)
        if checking():
            out._normalise(pack="mask" in changes, check_budget="budget" in changes, fields=list(changes))
        elif out.index is None:
            out.index = _raster_index(out.x.shape[0], out.x.shape[1], out.x.device)
        return out

    def to(self, *args: Any, **kwargs: Any) -> VisualTokens:
        """Move every tensor (``x`` and float signals/size get the dtype, if one is given)."""
        def mv(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            dev = next((a for a in args if isinstance(a, (str, torch.device))), kwargs.get("device"))
            return t.to(dev) if dev is not None else t
        return self._map(mv, budget_fn=mv)

    # ------------------------------------------------------------------ field plumbing
    def _map(self, fn: Callable[[Tensor], Tensor], *, mask: Any = ..., budget_fn: Callable | None = None,
             **overrides: Any) -> VisualTokens:
        """Apply ``fn`` to every per-token field (x, index, size, group, signals)."""
        out = dict(
            x=fn(self.x),
            index=fn(self.index),
            size=None if self.size is None else fn(self.size),
            group=None if self.group is None else fn(self.group),
            signals={k: {l: fn(t) for l, t in v.items()} for k, v in self.signals.items()},
            mask=(None if self.mask is None else fn(self.mask)) if mask is ... else mask,
            layout=self.layout,
            budget=self.budget if budget_fn is None or self.budget is None else budget_fn(self.budget),
            layer_space=self.layer_space,
        )
        out.update(overrides)
        return VisualTokens.unchecked(**out)

    # ------------------------------------------------------------------ keeping tokens
    def gather(self, idx: Tensor, valid: Tensor | None = None, *, some_invalid: bool | None = None) -> VisualTokens:
        """Tokens at positions ``idx`` ``[B, K]`` of each row, in that order.

        ``valid`` ``[B, K]`` marks real entries (padding entries may hold any index and must come
        after the real ones in each row). Every field and signal is gathered; ``budget`` and
        ``layout`` are kept as they are. Without ``valid`` (every entry real) and without a mask
        this costs one indexing op per field and no host sync; ``some_invalid`` (whether ``valid``
        holds a false entry, when the caller knows) saves the sync that finds out.
        """
        B = self.batch_size
        if idx.dim() != 2 or idx.shape[0] != B:
            raise InputError(f"gather index must be [B={B}, K], got {tuple(idx.shape)}")
        idx = idx.long()
        if valid is not None:
            idx = torch.where(valid, idx, torch.zeros_like(idx))
        rows = torch.arange(B, device=self.device).unsqueeze(1)

        def take(t: Tensor) -> Tensor:
            g = t[rows, idx]
            if valid is not None and g.is_floating_point():
                g.masked_fill_(~valid.view(*valid.shape, *([1] * (g.dim() - 2))), 0)  # g is a fresh copy
            return g

        if valid is None:
            new_mask = None
        elif some_invalid is None:
            new_mask = None if bool(valid.all()) else valid
        else:
            new_mask = valid if some_invalid else None
        if self.mask is not None and checking():
            taken = self.mask[rows, idx] if valid is None else self.mask[rows, idx] & valid
            if bool((taken != (valid if valid is not None else True)).any()):
                raise InputError("gather picked padding positions; keep indices must point at valid tokens")
        return self._map(take, mask=new_mask)

    def keep_mask(self, keep: Tensor) -> VisualTokens:
        """Keep the tokens where ``keep`` ``[B, N]`` is true, in their current order."""
        keep = keep & self.valid
        n = keep.sum(1)
        K = int(n.max().item()) if keep.numel() else 0
        # stable sort puts kept positions first, in their original order
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :K]
        valid = torch.arange(K, device=self.device).unsqueeze(0) < n.unsqueeze(1)
        return self.gather(order, valid)

    def merge(self, assign: Tensor, rep: Tensor, slot_valid: Tensor | None = None, *,
              complete: bool = False) -> VisualTokens:
        """Merge tokens into slots.

        ``assign`` ``[B, N]``: the output slot of each token (``-1`` drops it; padding is ignored).
        ``rep`` ``[B, M]``: for each slot, the position of its representative token, whose
        ``index`` and ``group`` the merged token takes. ``slot_valid`` ``[B, M]`` marks real slots
        (left-packed; default all). Features and signals are combined with size weights (signals
        follow :data:`SIGNAL_MERGE_RULES`), and ``size`` becomes the sum of member sizes.
        ``complete``: the caller guarantees that there is no padding, every ``assign`` is a slot
        ``>= 0`` and every slot gets a member (fewer ops: no dropped-token bookkeeping).
        """
        B, N = assign.shape
        M = rep.shape[1]
        dev = self.device
        if complete:
            live, slot, S, w = None, assign, M, self.sizes
        else:
            live = (assign >= 0) & self.valid
            slot, S = torch.where(live, assign, torch.full_like(assign, M)), M + 1  # M = trash slot
            w = self.sizes * live.to(self.sizes.dtype)
        new_size_all = torch.zeros(B, S, dtype=w.dtype, device=dev).scatter_add_(1, slot, w)
        den_cache: dict[torch.dtype, Tensor] = {}

        def den(acc: torch.dtype) -> Tensor:  # the slots' total size, shared by every "mean" field
            if acc not in den_cache:
                d = new_size_all.to(acc)
                den_cache[acc] = d if complete else d.clamp_min(torch.finfo(acc).tiny)
            return den_cache[acc]

        def reduce(t: Tensor, rule: str) -> Tensor:
            tail = t.shape[2:]
            ones = [1] * len(tail)
            idx = slot.view(B, N, *ones).expand(B, N, *tail)
            if rule == "sum":  # attention-like mass: the members' values add up
                src = t if live is None else t * live.view(B, N, *ones).to(t.dtype)
                return torch.zeros(B, S, *tail, dtype=t.dtype, device=dev).scatter_add_(1, idx, src)[:, :M]
            if rule == "mean":  # size-weighted mean, accumulated in at least float32
                acc = torch.promote_types(t.dtype, w.dtype)
                num = torch.zeros(B, S, *tail, dtype=acc, device=dev).scatter_add_(
                    1, idx, t.to(acc) * w.view(B, N, *ones).to(acc))
                return (num / den(acc).view(B, S, *ones))[:, :M].to(t.dtype)
            src = t if t.is_floating_point() else t.to(torch.float64)
            fill = float("inf") if rule == "min" else float("-inf")
            out = torch.full((B, S, *tail), fill, dtype=src.dtype, device=dev)
            out.scatter_reduce_(1, idx, src, reduce="amin" if rule == "min" else "amax", include_self=True)
            return out[:, :M].to(t.dtype)

        rows = torch.arange(B, device=dev).unsqueeze(1)
        if not complete:
            rep = rep.long().clamp(0, N - 1)
        signals = {}
        for name, per_layer in self.signals.items():
            rule = SIGNAL_MERGE_RULES.get(name, "mean")
            if rule not in _MERGE_RULES:
                raise InputError(f"unknown merge rule {rule!r} for signal {name!r}; use one of {_MERGE_RULES}")
            signals[name] = {l: reduce(t, rule) for l, t in per_layer.items()}
        out = VisualTokens.unchecked(
            x=reduce(self.x, "mean"),
            mask=slot_valid,
            index=self.index[rows, rep],
            size=new_size_all[:, :M],
            group=None if self.group is None else self.group[rows, rep],
            layout=self.layout,
            signals=signals,
            budget=self.budget,
            layer_space=self.layer_space,
        )
        if slot_valid is not None:
            out = out._zero_padding()
        return out

    def _zero_padding(self) -> VisualTokens:
        if self.mask is None:
            return self
        m = self.mask

        def z(t: Tensor) -> Tensor:
            if not t.is_floating_point():
                return t
            return t.masked_fill(~m.view(*m.shape, *([1] * (t.dim() - 2))), 0)
        return self._map(z, mask=m)

    # ------------------------------------------------------------------ partitions
    def split_groups(self) -> tuple[VisualTokens, int]:
        """One row per (image, partition): ``[B*G, Nmax]`` tokens and G.

        Row ``b*G + g`` holds image ``b``'s tokens of partition ``g`` in their current order, and
        its ``budget`` is the single column ``budget[b, g]`` (if a budget is set). Undo with
        :meth:`join_groups`.
        """
        G = self.num_groups
        B, N = self.x.shape[:2]
        dev = self.device
        group = self.group if self.group is not None else torch.zeros(B, N, dtype=torch.long, device=dev)
        if bool(((group >= G) & self.valid).any()):
            raise LayoutError(f"tokens carry partition ids >= {G}, but the budget has {G} columns")
        key = torch.arange(B, device=dev).unsqueeze(1) * G + group
        key = torch.where(self.valid, key, torch.full_like(key, B * G))
        flat, valid = _pack_by_key(key.reshape(-1), B * G)
        rows = self._flat()._index_rows(flat, valid)
        layouts = self.layouts()
        rows.layout = None if self.layout is None else tuple(layouts[r // G] for r in range(B * G))
        rows.budget = None if self.budget is None else self.budget.reshape(B * G, 1)
        return rows, G

    def join_groups(self, rows: VisualTokens, G: int) -> VisualTokens:
        """Inverse of :meth:`split_groups`: concatenate each image's partition rows in order.

        The result takes ``rows``' fields (so what an operator did to the rows is kept), this
        object's ``layout``, and the budget of the rows folded back to ``[B, G]`` (or None).
        """
        BG, M = rows.x.shape[:2]
        B = BG // G
        dev = rows.device
        key = (torch.arange(BG, device=dev) // G).unsqueeze(1).expand(BG, M)
        key = torch.where(rows.valid, key, torch.full_like(key, B))
        flat, valid = _pack_by_key(key.reshape(-1), B)
        out = rows._flat()._index_rows(flat, valid)
        out.layout = self.layout
        out.budget = None if rows.budget is None else rows.budget.reshape(B, G)
        return out

    def _flat(self) -> VisualTokens:
        """All tokens as one row ``[1, B*N]`` (padding included) for cross-row regrouping."""
        return self._map(lambda t: t.reshape(1, -1, *t.shape[2:]), mask=None, layout=None, budget=None)

    def _index_rows(self, flat: Tensor, valid: Tensor) -> VisualTokens:
        """Build rows from positions ``flat`` ``[R, K]`` into this single-row object."""
        def take(t: Tensor) -> Tensor:
            g = t[0][flat]
            if g.is_floating_point():
                g.masked_fill_(~valid.view(*valid.shape, *([1] * (g.dim() - 2))), 0)  # g is a fresh copy
            return g
        return self._map(take, mask=valid, budget=None)

    # ------------------------------------------------------------------ conversions
    def to_padded(self) -> tuple[Tensor, Tensor]:
        """``(x [B, N, D], valid [B, N])`` with padded features zeroed."""
        v = self.valid
        return self.x.masked_fill(~v.unsqueeze(-1), 0), v

    def unbind(self) -> list[Tensor]:
        """Per-image feature tensors ``[n_b, D]``."""
        return [self.x[b, :n] for b, n in enumerate(self.counts.tolist())]

    def unbind_index(self) -> list[Tensor]:
        """Per-image original indices ``[n_b]``."""
        return [self.index[b, :n] for b, n in enumerate(self.counts.tolist())]

    @classmethod
    def from_list(cls, xs: Sequence[Tensor], **fields: Any) -> VisualTokens:
        """Pad per-image ``[n_b, D]`` features into one batch (other fields as per-image lists)."""
        if not xs:
            raise InputError("from_list needs at least one image")
        n = max(int(t.shape[0]) for t in xs)
        B = len(xs)

        def pad(ts: Sequence[Tensor], fill: float | int | bool = 0) -> Tensor:
            first = ts[0]
            out = torch.full((B, n, *first.shape[1:]), fill, dtype=first.dtype, device=first.device)
            for b, t in enumerate(ts):
                out[b, : t.shape[0]] = t
            return out

        counts = torch.tensor([int(t.shape[0]) for t in xs], device=xs[0].device)
        mask = torch.arange(n, device=xs[0].device).unsqueeze(0) < counts.unsqueeze(1)
        kw: dict[str, Any] = {}
        for name in ("index", "size", "group"):
            if fields.get(name) is not None:
                kw[name] = pad(fields[name])
        if "index" not in kw:
            kw["index"] = torch.arange(n, device=xs[0].device).expand(B, n)
        if fields.get("signals"):
            kw["signals"] = {k: {l: pad(ts) for l, ts in v.items()} for k, v in fields["signals"].items()}
        return cls(x=pad(xs), mask=None if bool(mask.all()) else mask, layout=fields.get("layout"),
                   budget=fields.get("budget"), layer_space=fields.get("layer_space"), **kw)

    # ------------------------------------------------------------------ grid geometry
    def uniform_grid(self) -> tuple[int, int, int] | None:
        """``(P, h, w)`` when every image shares one layout whose ``P`` partitions are all ``h x w``
        (LLaVA-1.5: ``(1, 24, 24)``; LLaVA-NeXT 2x2: ``(5, 24, 24)``), else None. Host facts only."""
        lays = self.layouts()
        lay = lays[0] if lays else None
        if lay is None or any(other is not lay and other != lay for other in lays[1:]):
            return None
        if any(g != lay.grids[0] for g in lay.grids[1:]):
            return None
        return lay.num_partitions, lay.grids[0][0], lay.grids[0][1]

    def _grid_table(self, check: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``(offset, h, w)`` of each token's partition, each broadcastable to ``[B, N]``; ``check``:
        raise :class:`LayoutError` when a valid token lies outside its partition's grid (host sync)."""
        B, N = self.x.shape[:2]
        dev = self.device
        if B == 0:
            z = torch.zeros(0, N, dtype=torch.long, device=dev)
            return z, z + 1, z + 1
        layouts = self.layouts()
        if all(lay is None for lay in layouts):
            n_orig = int(self.index.max().item()) + 1 if self.index.numel() else N
            layouts = [Layout.square(max(n_orig, N))] * B
        if any(lay is None for lay in layouts):
            raise LayoutError("some images in the batch have a layout and others none; give every image a layout")
        shared = all(lay is layouts[0] or lay == layouts[0] for lay in layouts)
        if shared and layouts[0].num_partitions == 1:
            off_t, h_t, w_t = _layout_table(layouts[0], 1, dev)[0].unbind()
            if check:
                self._check_local(self.index, h_t * w_t)
            return off_t, h_t, w_t
        P = max(lay.num_partitions for lay in layouts)
        group = self.group if self.group is not None else torch.zeros(B, N, dtype=torch.long, device=dev)
        if check and bool(((group >= P) & self.valid).any()):
            raise LayoutError(f"a token's partition id is >= the {P} partitions its layout describes")
        g = group.clamp(0, P - 1)
        if shared:
            tab = _layout_table(layouts[0], P, dev)[g]  # [B, N, 3]
        else:
            rows = [list(_layout_rows(lay, P)) for lay in layouts]
            tab = torch.tensor(rows, dtype=torch.long, device=dev)[torch.arange(B, device=dev).unsqueeze(1), g]
        off, h, w = tab.unbind(-1)
        if check:
            self._check_local(self.index - off, h * w)
        return off, h, w

    def check_layout(self) -> None:
        """Raise :class:`LayoutError` when a valid token lies outside its partition's grid (one host
        sync; what :meth:`grid_position` checks, for code that reads the layout without it)."""
        self._grid_table(check=True)

    def _check_local(self, local: Tensor, hw: Tensor) -> None:
        bad = (local < 0) | (local >= hw)
        if self.mask is not None:
            bad = bad & self.mask
        if bool(bad.any()):
            raise LayoutError(
                "token indices fall outside their partition's grid; the layout does not describe these tokens "
                "(for LLaVA-NeXT, index is the position in the concatenation of all partitions' patch tokens)"
            )

    def grid_position(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(row, col, h, w)`` ``[B, N]`` long: each token's cell in its partition's grid.

        Uses ``layout`` (one per image or shared). Without a layout, a single square grid holding
        every original token is assumed, which needs a perfect-square token count.
        """
        off, h, w = self._grid_table(check=checking_structure())
        local = self.index - off
        shape = self.index.shape
        return local // w, local % w, h.expand(shape), w.expand(shape)


_FIELDS = tuple(f.name for f in dataclasses.fields(VisualTokens))


def _raster_index(B: int, N: int, device: torch.device) -> Tensor:
    """The default ``index``: ``arange(N)`` per row, marked so :attr:`VisualTokens.raster` knows it."""
    idx = torch.arange(N, device=device).expand(B, N)
    idx._vtc_raster = True
    return idx


def _layout_rows(layout: Layout, P: int) -> list[tuple[int, int, int]]:
    """``(offset, h, w)`` per partition, padded to ``P`` rows (repeating the last)."""
    rows = [(off, h, w) for (h, w), off in zip(layout.grids, layout.offsets)]
    return rows + [rows[-1]] * (P - len(rows))


_TABLES: dict[tuple[Layout, int, torch.device], Tensor] = {}


def _layout_table(layout: Layout, P: int, device: torch.device) -> Tensor:
    """``[P, 3]`` long ``(offset, h, w)`` per partition on ``device``, cached per layout."""
    key = (layout, P, device)
    t = _TABLES.get(key)
    if t is None:
        if len(_TABLES) > 256:
            _TABLES.clear()
        t = _TABLES[key] = torch.tensor(_layout_rows(layout, P), dtype=torch.long, device=device)
    return t


def _pack_by_key(key: Tensor, num_keys: int) -> tuple[Tensor, Tensor]:
    """Positions grouped by ``key`` (values ``0..num_keys-1``; ``num_keys`` = drop).

    Returns ``idx [num_keys, K]`` (positions into ``key``, in their original order within each key)
    and ``valid [num_keys, K]``.
    """
    dev = key.device
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    counts = torch.bincount(key.clamp_max(num_keys), minlength=num_keys + 1)[:num_keys]
    K = int(counts.max().item()) if counts.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    keep = sorted_key < num_keys
    pos = torch.arange(order.numel(), device=dev) - starts[sorted_key.clamp_max(num_keys - 1)]
    idx = torch.zeros(num_keys, max(K, 0), dtype=torch.long, device=dev)
    idx[sorted_key[keep], pos[keep]] = order[keep]
    valid = torch.arange(K, device=dev).unsqueeze(0) < counts.unsqueeze(1)
    return idx, valid
