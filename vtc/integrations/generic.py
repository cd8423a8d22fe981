"""A generic wrapper for users' own LLaVA-style code: vision tower + projector + pipeline.

``VisualCompressor(tower, projector, pipeline)(pixel_values)`` runs the tower (a Hugging Face
vision model or a timm VisionTransformer; a tap records the signals the pipeline needs), takes the
patch tokens of ``feature_layer`` (Hugging Face ``hidden_states`` indexing: ``-2`` is the
penultimate block's output; prefix tokens such as CLS dropped), runs the vision-stage operators,
the projector and the llm-stage operators (:mod:`vtc.integrations.stages`), and returns the
compressed projector outputs with the original index of every kept token. Splicing them into the
user's LLM input is the user's code; :meth:`VisualCompressor.compress` does the same from
features the user computed. The tower and projector are used as they are, never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from vtc.errors import InputError
from vtc.integrations.signals import open_tap, tokens_from
from vtc.integrations.stages import run_stages
from vtc.integrations.towers import feature_tokens, num_blocks, prefix_tokens
from vtc.tokens import Layout, VisualTokens

__all__ = ["VisualCompressor", "CompressedVisual"]


@dataclass
class CompressedVisual:
    """Compressed projector outputs: ``x`` ``[B, K, D]`` (zero-padded), ``mask`` ``[B, K]`` (None: all
    valid), ``index`` ``[B, K]`` original patch index of each token (a merged token: its
    representative), ``counts`` ``[B]`` and the full :class:`~vtc.tokens.VisualTokens`."""

    x: Tensor
    mask: Tensor | None
    index: Tensor
    counts: Tensor
    tokens: VisualTokens

    def unbind(self) -> list[Tensor]:
        """Per-image ``[k_b, D]`` embeddings, ready to splice into each prompt."""
        return self.tokens.unbind()


class VisualCompressor(nn.Module):
    """See the module docstring. ``grid``: the patch grid ``(h, w)`` (default: square from the count)."""

    def __init__(self, tower: nn.Module, projector: nn.Module | Any, pipeline: Any, *, feature_layer: int | Sequence[int] = -2,
                 prefix: int | None = None, grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        from vtc.pipeline import build

        self.tower = tower
        self.projector = projector
        self.pipeline = build(pipeline)
        self.feature_layer = feature_layer
        self.prefix = prefix_tokens(tower) if prefix is None else int(prefix)
        self.grid = grid
        self._tap: Any = None  # opened on the first call on pixel_values

    def _layout(self, n: int) -> Layout | None:
        if self.grid is not None:
            h, w = self.grid
            if h * w != n:
                raise InputError(f"grid {self.grid} has {h * w} cells but the tower gave {n} patch tokens")
            return Layout.grid(h, w)
        try:
            return Layout.square(n)
        except Exception:
            return None

    def compress(self, features: Tensor, tokens: VisualTokens | None = None) -> CompressedVisual:
        """Compress pre-projector patch ``features`` ``[B, N, D]`` (or ready ``tokens`` with signals)."""
        if tokens is None:
            if self.pipeline.requires:
                raise InputError(
                    f"the pipeline needs signals {self.pipeline.requires}; call the compressor on pixel_values "
                    "(the tower's tap records them) or pass VisualTokens with signals")
            tokens = VisualTokens(x=features, layout=self._layout(features.shape[1]))
        out = run_stages(self.pipeline, tokens, self.projector)
        return CompressedVisual(x=out.to_padded()[0], mask=out.mask, index=out.index, counts=out.counts, tokens=out)

    def forward(self, pixel_values: Tensor) -> CompressedVisual:
        if self._tap is None and self.pipeline.requires:
            self._tap = open_tap(self.tower, self.pipeline.requires, f"the pipeline {self.pipeline}", self.prefix,
                                 feature_layer=self._feature_block())
        feats = feature_tokens(self.tower, pixel_values, self.feature_layer, self.prefix)  # the tap records it
        tokens = tokens_from(feats, self._tap, self.pipeline.requires, self._layout(feats.shape[1]))
        return self.compress(feats, tokens)

    def _feature_block(self) -> int | None:
        """The tower layer of ``feature_layer`` (a ``hidden_states`` index; the last of a list)."""
        from vtc.taps.layers import hidden_state_layer

        layer = self.feature_layer
        layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
        return hidden_state_layer(int(layer), num_blocks(self.tower))

    def remove(self) -> None:
        """Remove the tap's hooks from the tower (a later call on pixel_values opens a new tap)."""
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
