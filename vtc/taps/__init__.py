"""Taps: record CLS attention, CLS logits, keys and hidden states from real vision towers.

``tap = attach(tower, {"cls_attn": [16, 22], "keys": [22]})`` hooks a Hugging Face CLIP/SigLIP,
timm or open_clip vision tower; run the tower as usual (its fused attention stays on) and read
``tap.signals``; ``to_tokens(features, tap)`` makes the :class:`~vtc.tokens.VisualTokens` operators
consume. See :mod:`vtc.taps.tap` for the signals and the layer numbering. Importing this package
needs only torch; each family's library is imported when a tower of that family is tapped.
"""

from vtc.taps.tap import CLS_SIGNALS, SIGNALS, Tap, attach
from vtc.taps.visual_tokens import to_tokens

__all__ = ["attach", "Tap", "to_tokens", "SIGNALS", "CLS_SIGNALS"]
