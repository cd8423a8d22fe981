"""Tiny randomly initialised LLaVA / LLaVA-NeXT models and processors, built offline from configs.

For tests, smoke runs and benchmarks of the machinery (never for accuracy): every piece is a stock
``transformers`` class (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
``CLIPVisionModel`` / ``SiglipVisionModel`` towers, a Llama decoder) and the processor is a stock
``LlavaProcessor`` / ``LlavaNextProcessor`` with a word-level tokenizer built in memory, so nothing
is downloaded. Shapes are LLaVA's with small widths: by default a 24x24 patch grid (576 visual
tokens) on 96-pixel images with 4-pixel patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TinySpec", "word_tokenizer", "random_llava", "random_llava_next", "DEFAULT_WORDS"]

#: a small vocabulary that covers the prompts used in tests and the quick benchmarks
DEFAULT_WORDS = (
    "user assistant system : ? . , what is the color shape of in image there how many are a an "
    "yes no red green blue yellow gray black white brown teal orange purple circle square "
    "triangle rectangle star cross small large big left right above below top bottom one two "
    "three four five six seven eight nine ten zero does contain any describe picture photo this "
    "answer with word single and or to on at it kind object objects count thing things"
).split()


@dataclass
class TinySpec:
    """Sizes of a tiny random LLaVA (defaults: 24x24 patch grid, 2-layer tower, 2-layer Llama)."""

    image_size: int = 96
    patch_size: int = 4
    vision_hidden: int = 32
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    tower: str = "clip"  # "clip" or "siglip"
    feature_layer: int = -2
    seed: int = 0


def word_tokenizer(words: tuple[str, ...] | list[str] = DEFAULT_WORDS, image_token: str = "<image>"):
    """A word-level ``PreTrainedTokenizerFast`` built in memory (lower-cases, splits punctuation)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", image_token]
    vocab: dict[str, int] = {}
    for w in [*specials, *words]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": image_token}, padding_side="left",
    )
    return fast


def _vision_config(spec: TinySpec):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = CLIPVisionConfig if spec.tower == "clip" else SiglipVisionConfig
    if spec.tower not in ("clip", "siglip"):
        from vtc.errors import ConfigError

        raise ConfigError(f"tower must be 'clip' or 'siglip', got {spec.tower!r}")
    return cls(
        hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden,
    )


def _text_config(spec: TinySpec, vocab_size: int, tokenizer: Any):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def _image_processor(spec: TinySpec, next_: bool):
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor

    common = dict(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    if not next_:
        return CLIPImageProcessor(**common)
    s = spec.image_size
    return LlavaNextImageProcessor(**common, image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [s, 3 * s], [3 * s, s]])


def _finish(model, tokenizer, spec: TinySpec):
    model.config.image_token_id = model.config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id
    return model.eval()


def random_llava(spec: TinySpec | None = None, *, tokenizer: Any = None, **overrides: Any):
    """``(model, processor)``: a tiny random ``LlavaForConditionalGeneration`` and its processor.

    ``tokenizer``: a word-level tokenizer from :func:`word_tokenizer` (default: over DEFAULT_WORDS).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    spec = TinySpec(**overrides) if spec is None else spec
    tok = word_tokenizer() if tokenizer is None else tokenizer
    strategy = "default" if spec.tower == "clip" else "full"
    cfg = LlavaConfig(
        vision_config=_vision_config(spec), text_config=_text_config(spec, len(tok), tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=spec.feature_layer,
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(cfg)
    proc = LlavaProcessor(
        image_processor=_image_processor(spec, False), tokenizer=tok, patch_size=spec.patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=1 if spec.tower == "clip" else 0,
    )
    return _finish(model, tok, spec), proc


def random_llava_next(spec: TinySpec | None = None, *, tokenizer: Any = None, **overrides: Any):
    """``(model, processor)``: a tiny random ``LlavaNextForConditionalGeneration`` (AnyRes) and its processor.

    ``tokenizer``: as for :func:`random_llava`.
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    spec = TinySpec(**overrides) if spec is None else spec
    tok = word_tokenizer() if tokenizer is None else tokenizer
    s = spec.image_size
    cfg = LlavaNextConfig(
        vision_config=_vision_config(spec), text_config=_text_config(spec, len(tok), tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=spec.feature_layer,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [s, 3 * s], [3 * s, s]],
    )
    torch.manual_seed(spec.seed)
    model = LlavaNextForConditionalGeneration(cfg)
    proc = LlavaNextProcessor(
        image_processor=_image_processor(spec, True), tokenizer=tok, patch_size=spec.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    return _finish(model, tok, spec), proc
