"""Layer numbers of a vision tower: negative indices and the names ``"feature"`` / ``"last"``, resolved once.

Operators name the tower layers they read in a form that does not depend on one tower: a
0-based layer number (HF's ``encoder.layers[l]``, timm's ``blocks[l]``), a negative number counting
from the end (``-1`` is the last layer), ``"last"``, or ``"feature"`` (the layer whose output the
model uses as its visual features: LLaVA-1.5's ``vision_feature_layer=-2`` is layer 22 of CLIP-L's
24; a Qwen VL tower's merger reads its last layer). A :class:`LayerSpace` holds the two facts these
need (the tower's depth and its feature layer) and turns each form into the non-negative layer
number signals are recorded under. A tap builds its ``LayerSpace`` when it opens on a real tower
(:attr:`vtc.taps.Tap.layer_space`) and resolves the pipeline's ``requires`` with it once; the
:class:`~vtc.tokens.VisualTokens` built from the tap carry it (``tokens.layer_space``) so that
``tokens.signal("cls_attn", "feature")`` finds what the tap recorded under ``22``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Union

from vtc.errors import TapError

__all__ = ["Layer", "LAYER_NAMES", "LayerSpace", "hidden_state_layer", "is_layer", "sorted_layers"]

#: The symbolic layer names.
LAYER_NAMES: tuple[str, ...] = ("feature", "last")

#: The type of a layer in an operator's config: a layer number (negative counts from the end) or a name.
Layer = Union[int, Literal["feature", "last"]]


def is_layer(layer: object) -> bool:
    """True for an int (not a bool) or one of :data:`LAYER_NAMES`."""
    return (isinstance(layer, int) and not isinstance(layer, bool)) or (isinstance(layer, str) and layer in LAYER_NAMES)


def _order(layer: object) -> tuple[int, int, str]:
    if isinstance(layer, int) and not isinstance(layer, bool):
        return (0 if layer >= 0 else 1, layer, "")
    return (2, LAYER_NAMES.index(layer) if layer in LAYER_NAMES else len(LAYER_NAMES), str(layer))


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

    def resolve(self, layer: Layer, where: str = "", error: type[Exception] = TapError) -> int:
        """``layer`` as a non-negative layer number; ``error`` (default :class:`TapError`) names the
        tower's depth when it is out of range, not a layer form, or ``"feature"`` is unknown.
        ``where`` says where the layer came from, for the message (``"requires['cls_attn']"``)."""
        L = self.num_layers
        at = f" in {where}" if where else ""
        if isinstance(layer, str) and layer in LAYER_NAMES:
            if layer == "last":
                return L - 1
            if self.feature_layer is None:
                raise error(
                    f"layer 'feature'{at}: this tower's feature layer is not known. Pass it when the tap opens, "
                    "e.g. vtc.taps.attach(tower, requires, feature_layer=-2) for LLaVA-1.5 "
                    "(vtc.taps.hidden_state_layer(config.vision_feature_layer, num_layers) converts a "
                    "hidden_states index), or name the layer by number"
                )
            return self.feature_layer
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise error(
                f"layer numbers must be integers or one of {', '.join(map(repr, LAYER_NAMES))}, got {layer!r}{at}"
            )
        if not -L <= layer < L:
            raise error(
                f"layer {layer}{at} does not exist: this tower has {L} layers, valid layers are 0..{L - 1} "
                f"(or -{L}..-1 counting from the end, or {', '.join(map(repr, LAYER_NAMES))})"
            )
        return layer % L

    def resolve_all(self, layers: Iterable[Layer], where: str = "", error: type[Exception] = TapError) -> list[int]:
        """Every layer of ``layers`` resolved, duplicates dropped, ascending."""
        return sorted({self.resolve(l, where, error) for l in layers})
