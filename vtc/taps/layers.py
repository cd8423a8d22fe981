"""Layer numbers of a vision tower: negative indices, names and tower-relative forms, resolved once.

Operators name the tower layers they read in a form that does not depend on one tower:

- a 0-based layer number (HF's ``encoder.layers[l]``, timm's ``blocks[l]``); a negative number
  counts from the end (``-1`` is the last layer);
- ``"last"``, or ``"feature"``: the layer whose output the model uses as its visual features
  (LLaVA-1.5's ``vision_feature_layer=-2`` is layer 22 of CLIP-L's 24; a Qwen VL tower's merger
  reads its last layer);
- an offset from a name: ``"feature-6"``, ``"feature+1"``, ``"last-2"`` (it must exist);
- a relative depth ``"p/q"``: layer ``floor(num_layers * p / q)`` with ``0 <= p < q``, i.e. the
  layer at that fraction of the depth (``"1/3"`` is layer 8 of 24, 1 of 4, 10 of 32); it reads
  as "layer p of a q-layer tower, scaled" too (``"8/24"`` is also layer 8 of 24);
- in a list of layers only, a span ``"a..b"`` of every layer from ``a`` to ``b`` (both ends
  included, each end any form above, integers included): ``"feature-6..feature"`` is 16..22 on
  CLIP-L. A span that starts before layer 0 starts at layer 0 (``"feature-6..feature"`` on a
  4-layer tower with feature layer 2 is 0..2); its end must exist.

A :class:`LayerSpace` holds the two facts these need (the tower's depth and its feature layer) and
turns each form into the non-negative layer number signals are recorded under. A tap builds its
``LayerSpace`` when it opens on a real tower (:attr:`vtc.taps.Tap.layer_space`) and resolves the
pipeline's ``requires`` with it once; the :class:`~vtc.tokens.VisualTokens` built from the tap
carry it (``tokens.layer_space``) so that ``tokens.signal("cls_attn", "feature")`` finds what the
tap recorded under ``22``. Operator configs check a layer's form when they are built
(:func:`check_layer`), so a typo fails before any model runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Union

from vtc.errors import ConfigError, TapError

__all__ = ["Layer", "LAYER_NAMES", "LAYER_FORMS", "LayerSpace", "check_layer", "expand_layers", "hidden_state_layer",
           "is_layer", "sorted_layers"]

#: The symbolic layer names.
LAYER_NAMES: tuple[str, ...] = ("feature", "last")

#: What a layer may be, for messages.
LAYER_FORMS = ("an integer (negative counts from the end), 'feature', 'last', an offset such as 'feature-6', "
               "or a relative depth such as '1/3'")

#: The type of a layer in an operator's config: a layer number (negative counts from the end) or a
#: tower-relative form (a name, an offset from a name, a relative depth; a span in lists), see the
#: module docstring; configs check the form with :func:`check_layer`.
Layer = Union[int, str]

#: separator of a span's two ends
SPAN = ".."
_NAMED = re.compile(r"(feature|last)(?:([+-])(\d+))?")
_DEPTH = re.compile(r"(\d+)/(\d+)")
_INT = re.compile(r"[+-]?\d+")


def _is_int(layer: object) -> bool:
    return isinstance(layer, int) and not isinstance(layer, bool)


def _single(layer: object, in_span: bool = False) -> bool:
    """Whether ``layer`` is one layer's form (a span's end may also be an integer written as text)."""
    if _is_int(layer):
        return True
    if not isinstance(layer, str):
        return False
    if _NAMED.fullmatch(layer):
        return True
    m = _DEPTH.fullmatch(layer)
    if m:
        return int(m[1]) < int(m[2])
    return in_span and _INT.fullmatch(layer) is not None


def _is_span(layer: object) -> bool:
    if not isinstance(layer, str) or layer.count(SPAN) != 1:
        return False
    a, b = layer.split(SPAN)
    return _single(a, True) and _single(b, True)


def is_layer(layer: object, spans: bool = False) -> bool:
    """True for one layer's form (an int, not a bool; a name; an offset; a relative depth), or also a
    span ``"a..b"`` when ``spans``."""
    return _single(layer) or (spans and _is_span(layer))


def check_layer(layer: object, where: str, spans: bool = False) -> None:
    """Raise :class:`~vtc.errors.ConfigError` naming ``where`` unless ``layer`` is a layer form
    (see the module docstring; spans only when ``spans``)."""
    if is_layer(layer, spans):
        return
    if not spans and _is_span(layer):
        raise ConfigError(f"{where}: {layer!r} is a span of several layers; this argument takes one layer: "
                          f"{LAYER_FORMS}")
    extra = ", or in a list a span such as 'feature-6..feature'" if spans else ""
    hint = " (a relative depth p/q needs p < q)" if isinstance(layer, str) and _DEPTH.fullmatch(layer) else ""
    raise ConfigError(f"{where}: {layer!r} is not a layer{hint}; a layer is {LAYER_FORMS}{extra}")


def _order(layer: object) -> tuple[int, float, str]:
    """Numbers, negative numbers, relative depths (by depth), names and offsets (by name), then the rest."""
    if _is_int(layer):
        return (0 if layer >= 0 else 1, layer, "")
    s = str(layer)
    m = _DEPTH.fullmatch(s)
    if m and int(m[2]):
        return (2, int(m[1]) / int(m[2]), s)
    m = _NAMED.fullmatch(s)
    if m:
        return (3, LAYER_NAMES.index(m[1]), s)
    return (4, 0, s)


def sorted_layers(layers: Iterable[Layer]) -> list[Layer]:
    """Layers in a stable order, mixed forms allowed: ``[0, 22, -2, "feature", "last"]`` (a plain
    ``sorted`` fails on an int next to a name). Duplicates are kept; pass a set to drop them."""
    return sorted(layers, key=_order)


def hidden_state_layer(index: int, num_layers: int) -> int:
    """The layer number whose output is ``hidden_states[index]`` of a Hugging Face tower.

    ``hidden_states`` has ``num_layers + 1`` entries: entry 0 is the embeddings, entry ``i`` the output
    of layer ``i - 1``. So LLaVA's ``vision_feature_layer=-2`` is layer ``num_layers - 2`` and a
    positive ``i`` is layer ``i - 1``; entry 0 (the embeddings) is not a layer's output.
    """
    if isinstance(index, bool) or not isinstance(index, int):
        raise TapError(f"a hidden_states index must be an integer, got {index!r}")
    n = num_layers + 1
    if not -n <= index < n:
        raise TapError(f"hidden_states[{index}] does not exist: a {num_layers}-layer tower has {n} hidden states")
    pos = index % n
    if pos == 0:
        raise TapError(
            f"hidden_states[{index}] is the embeddings, not the output of a layer; name a layer 1..{num_layers} "
            "(or a negative index) as the feature layer"
        )
    return pos - 1


@dataclass(frozen=True)
class LayerSpace:
    """The layers of one vision tower: ``num_layers`` and the ``feature_layer`` (non-negative, or None).

    :meth:`resolve` maps every accepted form to a layer number in ``0 .. num_layers - 1``.
    ``feature_layer=None`` means the model's feature layer is not known (a bare CLIP tower can serve
    a VLM that reads layer 22 or 23); ``"feature"`` then raises instead of guessing.
    """

    num_layers: int
    feature_layer: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise TapError(f"LayerSpace.num_layers must be a positive integer, got {self.num_layers!r}")
        if self.feature_layer is not None:
            f = self.feature_layer
            if isinstance(f, bool) or not isinstance(f, int) or not -self.num_layers <= f < self.num_layers:
                raise TapError(
                    f"feature layer {f!r} does not exist in a {self.num_layers}-layer tower "
                    f"(valid: 0..{self.num_layers - 1}, or -{self.num_layers}..-1 counting from the end)"
                )
            object.__setattr__(self, "feature_layer", f % self.num_layers)

    def _raw(self, layer: Any, at: str, error: type[Exception]) -> int:
        """The layer number a single form names, not yet checked against the depth (may be out of range)."""
        L = self.num_layers
        if _is_int(layer):
            return layer + L if layer < 0 else layer
        m = _NAMED.fullmatch(layer) if isinstance(layer, str) else None
        if m:
            if m[1] == "last":
                base = L - 1
            elif self.feature_layer is None:
                raise error(
                    f"layer {layer!r}{at}: this tower's feature layer is not known. Pass it when the tap opens, "
                    "e.g. vtc.taps.attach(tower, requires, feature_layer=-2) for LLaVA-1.5 "
                    "(vtc.taps.hidden_state_layer(config.vision_feature_layer, num_layers) converts a "
                    "hidden_states index), or name the layer by number"
                )
            else:
                base = self.feature_layer
            return base + (0 if m[2] is None else int(m[3]) * (1 if m[2] == "+" else -1))
        m = _DEPTH.fullmatch(layer) if isinstance(layer, str) else None
        if m and int(m[1]) < int(m[2]):
            return L * int(m[1]) // int(m[2])
        self._refuse(layer, at, error)

    @staticmethod
    def _refuse(layer: Any, at: str, error: type[Exception]) -> int:
        raise error(
            f"layer numbers must be integers or one of {', '.join(map(repr, LAYER_NAMES))} (or an offset such as "
            f"'feature-6', a relative depth such as '1/3', in a list a span 'a..b'), got {layer!r}{at}"
        )

    def _check(self, layer: Any, l: int, at: str, error: type[Exception]) -> int:
        L = self.num_layers
        if not 0 <= l < L:
            named = "" if _is_int(layer) else f" (= {l})"
            raise error(
                f"layer {layer if _is_int(layer) else repr(layer)}{named}{at} does not exist: this tower has {L} "
                f"layers, valid layers are 0..{L - 1} (or -{L}..-1 counting from the end, or "
                f"{', '.join(map(repr, LAYER_NAMES))})"
            )
        return l

    def resolve(self, layer: Layer, where: str = "", error: type[Exception] = TapError) -> int:
        """``layer`` (one layer's form) as a non-negative layer number; ``error`` (default
        :class:`TapError`) names the tower's depth when it is out of range, not a layer form, a span,
        or ``"feature"`` is unknown. ``where`` says where the layer came from, for the message
        (``"requires['cls_attn']"``)."""
        at = f" in {where}" if where else ""
        if _is_span(layer):
            raise error(f"layer {layer!r}{at} is a span of several layers; ask for one layer here "
                        "(spans are for lists of layers, e.g. vtc-cls layers=)")
        if isinstance(layer, str) and _INT.fullmatch(layer):  # text is not a layer number (outside a span)
            return self._refuse(layer, at, error)
        return self._check(layer, self._raw(layer, at, error), at, error)

    def expand(self, layer: Layer, where: str = "", error: type[Exception] = TapError) -> list[int]:
        """The layer numbers ``layer`` names: one for a single form, every layer of a span ``"a..b"``
        (ascending; a span starting before layer 0 starts at 0, its end must exist)."""
        if not _is_span(layer):
            return [self.resolve(layer, where, error)]
        at = f" in {where}" if where else ""
        a, b = (int(e) if _INT.fullmatch(e) else e for e in layer.split(SPAN))
        lo = self._raw(a, at, error)
        hi = self._check(b, self._raw(b, at, error), f" (the end of the span {layer!r}){at}", error)
        if lo > hi:
            raise error(f"the span {layer!r}{at} is empty on this tower: it starts at layer {lo}, after its end {hi}")
        return list(range(max(lo, 0), hi + 1))

    def resolve_all(self, layers: Iterable[Layer], where: str = "", error: type[Exception] = TapError) -> list[int]:
        """Every layer of ``layers`` resolved (spans expanded), duplicates dropped, ascending."""
        return sorted({l for layer in layers for l in self.expand(layer, where, error)})


def expand_layers(space: LayerSpace | None, layers: Iterable[Layer], where: str = "",
                  error: type[Exception] = TapError) -> list[Layer]:
    """``layers`` resolved against ``space`` (:meth:`LayerSpace.resolve_all`), or as given when no
    space is known (a lookup with :meth:`vtc.tokens.VisualTokens.signal` then says what a relative
    form needs)."""
    return list(layers) if space is None else space.resolve_all(layers, where, error)
