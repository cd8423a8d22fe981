"""VTC-CLS: keep the patches the vision tower's CLS token attends to most, summed over layers.

Paper: "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs" (Wang et al., 2024).
Described in methods.md §2.

Score of patch ``j`` = sum over ``layers`` of the head-mean, post-softmax CLS→patch attention
``signals["cls_attn"][l][:, j]``; keep the top ``k`` (ties: lowest position) in raster order, before
the projector (stage ``vision``). Default layers ``"feature-6..feature"``: the seven layers ending at
the layer whose output the model uses, resolved against the tower (16..22 on LLaVA-1.5's CLIP-L,
whose features are layer 22 of 24: the official ``--layer 16`` with the ``attentions[start:-1]``
slice; a span starting before layer 0 starts there, so 0..2 on a 4-layer tower with feature layer
2). Each layer is summed once (duplicates and overlapping spans count once).
As in the official code the layers are stacked and summed in one reduction, in the signal's dtype
(fp16 in the official runs): one rounding, so half-precision scores match the official ones.

The official code only supports LLaVA-1.5 (one partition, batch 1); on AnyRes inputs vtc scores
each partition with its own CLS attention and, given per-partition budgets, selects per partition.
That generalisation is vtc's, not the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from vtc.errors import ConfigError, SignalError
from vtc.ops.base import SelectConfig, Selector
from vtc.ops.selection import keep_top
from vtc.registry import register
from vtc.taps.layers import Layer, check_layer, expand_layers, sorted_layers
from vtc.tokens import VisualTokens


@dataclass
class VtcClsConfig(SelectConfig):
    """``layers``: vision layers whose CLS attention is summed (HF numbering, 0-based; negative numbers,
    ``"feature"``, ``"last"``, offsets, relative depths and spans such as ``"feature-6..feature"``
    resolve against the tower, see :mod:`vtc.taps.layers`)."""

    layers: list[Layer] = field(default_factory=lambda: ["feature-6..feature"])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.layers:
            raise ConfigError("vtc-cls needs at least one layer in layers=")
        for layer in self.layers:
            check_layer(layer, "vtc-cls.layers", spans=True)


@register("vtc-cls")
class VtcCls(Selector):
    Config = VtcClsConfig
    default_stage = "vision"

    @property
    def requires(self) -> dict[str, list[int]]:
        return {"cls_attn": sorted_layers(set(self.config.layers))}

    int_budget = True

    def scores(self, tokens: VisualTokens) -> Tensor:
        op = "operator 'vtc-cls'"
        layers = expand_layers(tokens.layer_space, self.config.layers, f"{op}'s 'cls_attn' layers", SignalError)
        sig = [tokens.signal("cls_attn", l, op=op) for l in layers]
        return sig[0] if len(sig) == 1 else torch.stack(sig).sum(0)  # one reduction, the signal's dtype

    def select(self, tokens: VisualTokens, k: Tensor | int) -> VisualTokens:
        return keep_top(tokens, self.scores(tokens), k)
