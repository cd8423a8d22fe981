"""What each embedded model is: architecture sizes, training data mix and training-recipe defaults.

- ``tiny-llava``: CLIP-style tower with a CLS token, 96-pixel images in 4-pixel patches (a 24x24
  grid, 576 visual tokens, LLaVA-1.5's shape), MLP projector (``mlp2x_gelu``), small Llama decoder;
  trained on ``shapes`` (96x96 scenes) and easy-VQA.
- ``tiny-llava-next``: the same design with AnyRes: 64-pixel views (16x16 grid per partition), a
  base view plus up to 4 crops (pinpoints 1x2, 2x1, 2x2, 1x3, 3x1 of 64 pixels; 2x2 crops give
  5x256 + 32 newline = 1312 visual tokens); initialised from the trained ``tiny-llava`` (tower
  position embeddings resized 24x24 -> 16x16, the newline vector new) and trained on
  ``shapes-large`` (128x128 / 64x128 / 128x64 canvases whose small objects need the crops).
- ``tiny-mqt``: ``tiny-llava``'s tower and decoder (initialised from the trained ``tiny-llava``)
  with the MQT projector (``vtc.ops.mqt``, 256 queries) in place of the MLP projector; the tower
  stays frozen, MQT and the decoder train with nested query counts.

The sizes were chosen by measuring training throughput on a 2-core CPU
(``eval/tiny_throughput.py``). Every model is built from stock ``transformers`` classes by
:func:`vtc.models.random.random_llava` / ``random_llava_next`` with the tiny vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vtc.errors import ConfigError
from vtc.models.random import TinySpec

__all__ = ["Variant", "TrainRecipe", "VARIANT_SPECS", "variant", "build_model"]


@dataclass(frozen=True)
class TrainRecipe:
    """Training defaults of a variant (every field can be overridden from the command line).

    ``batch``: images per step; ``turns``: questions per image (one multi-turn conversation);
    ``mix``: ``(data set, share of the batch)``; ``prune_share``: share of steps that feed a random
    subset of the visual tokens (count log-uniform in ``[prune_min, N]``, kept in original order);
    ``original_positions_share``: of those steps, the share that keeps the original position ids
    (the rest renumber contiguously); ``aux_weight``: weight of the per-patch and CLS auxiliary
    losses on the tower (training only, see ``aux.py``); ``freeze_tower``: train without the tower.
    """

    batch: int = 16
    turns: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.05
    clip: float = 1.0
    mix: tuple[tuple[str, float], ...] = (("shapes", 0.75), ("easy-vqa", 0.25))
    prune_share: float = 0.5
    prune_min: int = 4
    original_positions_share: float = 0.5
    aux_weight: float = 0.5
    freeze_tower: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Variant:
    """An embedded model: its name, HF class family, sizes, MQT shape and training recipe."""

    name: str
    family: str  # "llava" or "llava-next"
    spec: TinySpec
    recipe: TrainRecipe = field(default_factory=TrainRecipe)
    mqt_queries: int = 0  # > 0: an MQT projector with this many queries replaces the MLP projector
    mqt_heads: int = 4
    init_from: str | None = None  # variant whose trained weights initialise this one

    @property
    def eval_datasets(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.recipe.mix)


_LLAVA_SPEC = TinySpec(image_size=96, patch_size=4, vision_hidden=64, vision_layers=4, vision_heads=4,
                       text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=4, text_intermediate=352)
_NEXT_SPEC = dataclasses.replace(_LLAVA_SPEC, image_size=64)

VARIANT_SPECS: dict[str, Variant] = {
    "tiny-llava": Variant("tiny-llava", "llava", _LLAVA_SPEC),
    "tiny-llava-next": Variant(
        "tiny-llava-next", "llava-next", _NEXT_SPEC,
        TrainRecipe(batch=8, mix=(("shapes-large", 1.0),), prune_min=8, lr=5e-4, warmup=50),
        init_from="tiny-llava"),
    "tiny-mqt": Variant(
        "tiny-mqt", "llava", _LLAVA_SPEC,
        TrainRecipe(lr=5e-4, warmup=50, prune_share=0.0, freeze_tower=True, aux_weight=0.0),
        mqt_queries=256, init_from="tiny-llava"),
}


def variant(name: str, **spec_overrides) -> Variant:
    """The variant ``name``; ``spec_overrides`` change its sizes (tests use smaller ones)."""
    try:
        v = VARIANT_SPECS[name]
    except KeyError:
        raise ConfigError(f"unknown tiny variant {name!r}; choose one of {', '.join(VARIANT_SPECS)}") from None
    if spec_overrides:
        v = dataclasses.replace(v, spec=dataclasses.replace(v.spec, **spec_overrides))
    return v


def build_model(v: Variant):
    """``(model, processor)``: a freshly initialised HF model of variant ``v`` and its processor."""
    from vtc.models.random import random_llava, random_llava_next
    from vtc.models.tiny.vocab import tokenizer

    make = random_llava if v.family == "llava" else random_llava_next
    model, proc = make(v.spec, tokenizer=tokenizer())
    model.config.use_cache = True
    return model, proc
