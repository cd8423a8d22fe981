"""Taps: record per-token signals from real vision towers while they keep their fused attention.

Supported towers: Hugging Face CLIP / SigLIP (``model.model.vision_tower`` of LLaVA), the Qwen2-VL /
Qwen2.5-VL / Qwen3-VL vision towers (``model.model.visual``), timm ``VisionTransformer`` and
open_clip ``VisionTransformer``. Importing this package needs only torch; each family's library is
imported when a tower of that family is tapped.

Open a tap with what the operators require; layers may be numbers, negative numbers, ``"last"``
or ``"feature"`` (resolved once, here, against the tower: see :mod:`vtc.taps.layers`)::

    tap = vtc.taps.attach(tower, pipeline.requires, feature_layer=-2)   # LLaVA-1.5: -2 (layer 22)
    tap = vtc.taps.attach(model.model.visual, {"attn_received": ["feature"], "key_norms": [-1]})

Run the tower as usual, then read the signals of that forward (:mod:`vtc.taps.tap` lists them:
``cls_attn``, ``cls_logits``, ``keys``, ``hidden`` and the CLS-free ``attn_received``,
``key_norms``)::

    tap.signals[name][layer]            # [B, N] (batched towers) or [S] over the packed sequence (Qwen)
    tap.signal(name, "feature")         # any layer form
    tap.per_image(name, layer)          # one tensor per image, in the tower's token order
    to_merged_grid(sig, merge_size=2)   # Qwen: a per-patch signal -> the merged tokens (mean of each 2x2)
    to_tokens(features, tap)            # VisualTokens (batched towers), carrying tap.layer_space
    tap.remove()                        # or `with tap:`; the tower is left exactly as it was

``tap.layer_space`` (:class:`LayerSpace`: the tower's depth and feature layer) is what
:meth:`vtc.tokens.VisualTokens.signal` resolves ``"feature"`` / negative layers with; an
integration building its own VisualTokens passes ``layer_space=tap.layer_space``. A request for
``cls_attn`` / ``cls_logits`` on a tower without a CLS token (SigLIP, Qwen) raises
:class:`~vtc.errors.TapError` naming ``attn_received`` and ``key_norms``.
"""

from vtc.taps.layers import LAYER_NAMES, Layer, LayerSpace, hidden_state_layer, sorted_layers
from vtc.taps.qwen_vl import to_merged_grid
from vtc.taps.received import MAX_CHUNK_ELEMENTS
from vtc.taps.tap import CLS_FREE_SIGNALS, CLS_SIGNALS, SIGNALS, Tap, attach
from vtc.taps.visual_tokens import to_tokens

__all__ = [
    "attach", "Tap", "to_tokens", "to_merged_grid", "SIGNALS", "CLS_SIGNALS", "CLS_FREE_SIGNALS",
    "LayerSpace", "Layer", "LAYER_NAMES", "hidden_state_layer", "sorted_layers", "MAX_CHUNK_ELEMENTS",
]
