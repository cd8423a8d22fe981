"""Tiny randomly initialised LLaVA / LLaVA-NeXT / Qwen VL models and processors, built offline from configs.

For tests, smoke runs and benchmarks of the machinery (never for accuracy): every piece is a stock
``transformers`` class (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
``CLIPVisionModel`` / ``SiglipVisionModel`` towers, a Llama decoder; ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``,
``LlavaOnevisionForConditionalGeneration``) and the processor is
the family's stock processor with a word-level tokenizer built in memory, so nothing is
downloaded. LLaVA shapes are LLaVA's with small widths: by default a 24x24 patch grid (576 visual
tokens) on 96-pixel images with 4-pixel patches. Qwen VL models keep their dynamic resolution
(4-pixel patches, 2x2 merge: an image of ``H x W`` pixels, resized to multiples of 8, gives
``H/8 * W/8`` visual tokens) and their real structure (window attention with a full-attention
block in Qwen2.5-VL, DeepStack in Qwen3-VL, M-RoPE) at small widths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TinySpec", "QwenSpec", "word_tokenizer", "random_llava", "random_llava_next", "random_llava_onevision",
           "random_qwen2_vl",
           "random_qwen2_5_vl", "random_qwen3_vl", "DEFAULT_WORDS", "QWEN_IMAGE"]

#: a small vocabulary that covers the prompts used in tests and the quick benchmarks
DEFAULT_WORDS = (
    "user assistant system : ? . , what is the color shape of in image there how many are a an "
    "yes no red green blue yellow gray black white brown teal orange purple circle square "
    "triangle rectangle star cross small large big left right above below top bottom one two "
    "three four five six seven eight nine ten zero does contain any describe picture photo this "
    "answer with word single and or to on at it kind object objects count thing things"
).split()


@dataclass(kw_only=True)
class _Sizes:
    """The sizes every tiny random model shares: patches, tower width/depth, decoder, seed."""

    patch_size: int = 4
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    seed: int = 0


@dataclass(kw_only=True)
class TinySpec(_Sizes):
    """Sizes of a tiny random LLaVA (defaults: 24x24 patch grid, 4-layer tower, 2-layer Llama)."""

    image_size: int = 96
    vision_layers: int = 4
    tower: str = "clip"  # "clip" or "siglip"
    feature_layer: int = -2


def word_tokenizer(words: tuple[str, ...] | list[str] = DEFAULT_WORDS, image_token: str = "<image>",
                   specials: tuple[str, ...] = ()):
    """A word-level ``PreTrainedTokenizerFast`` built in memory (lower-cases, splits punctuation).

    ``specials``: more special tokens (never split), after the image token in the vocabulary.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    reserved = ["<pad>", "<s>", "</s>", "<unk>", image_token, *specials]
    vocab: dict[str, int] = {}
    for w in [*reserved, *words]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": image_token}, padding_side="left",
    )
    if specials:
        fast.add_special_tokens({"additional_special_tokens": list(specials)})
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


def _text_sizes(spec: _Sizes, vocab_size: int, tokenizer: Any) -> dict[str, Any]:
    """The decoder's config arguments every family shares (widths, depth, GQA, special token ids)."""
    return dict(
        vocab_size=vocab_size, hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def _text_config(spec: TinySpec, vocab_size: int, tokenizer: Any):
    from transformers import LlamaConfig

    return LlamaConfig(**_text_sizes(spec, vocab_size, tokenizer))


def _generation_ids(model: Any, tokenizer: Any) -> None:
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id


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
    _generation_ids(model, tokenizer)
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


def random_llava_onevision(spec: TinySpec | None = None, *, tokenizer: Any = None, max_crops: int = 2,
                           **overrides: Any):
    """``(model, processor)``: a tiny random ``LlavaOnevisionForConditionalGeneration`` and its processor.

    As LLaVA-OneVision: a SigLIP tower without CLS read at its last layer (``vision_feature_layer=-1``,
    strategy ``"full"``; override ``tower``/``feature_layer`` in ``spec``), AnyRes crops on pinpoints
    up to 3x3 of ``image_size``, and ``vision_aspect_ratio="anyres_max_{max_crops}"``: an unpadded crop
    grid of more than about ``1.21 * max_crops`` base grids is bilinearly downsampled (the default 2
    makes 2x2 and larger crop grids downsample on these tiny images, as 3x3 and larger do on the
    real model's ``anyres_max_9``). Prompts with several images per sample use the base view only.
    ``tokenizer``: a :func:`word_tokenizer` with ``specials=("<video>",)`` (default: over DEFAULT_WORDS).
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    defaults = {"tower": "siglip", "feature_layer": -1}
    spec = TinySpec(**{**defaults, **overrides}) if spec is None else spec
    tok = word_tokenizer(specials=("<video>",)) if tokenizer is None else tokenizer
    s = spec.image_size
    pinpoints = [[s * a, s * b] for a in (1, 2, 3) for b in (1, 2, 3)]
    strategy = "default" if spec.tower == "clip" else "full"
    aspect = f"anyres_max_{max_crops}"
    cfg = LlavaOnevisionConfig(
        vision_config=_vision_config(spec), text_config=_text_config(spec, len(tok), tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=spec.feature_layer, vision_feature_select_strategy=strategy,
        image_grid_pinpoints=pinpoints, vision_aspect_ratio=aspect, projector_hidden_act="gelu",
    )
    if spec.tower == "siglip":
        cfg.vision_config.vision_use_head = False
    torch.manual_seed(spec.seed)
    model = LlavaOnevisionForConditionalGeneration(cfg)
    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    proc = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": s, "width": s}, image_grid_pinpoints=pinpoints,
                                                     **norm),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": s, "width": s}, **norm),
        tokenizer=tok, num_image_tokens=(s // spec.patch_size) ** 2, vision_feature_select_strategy=strategy,
        vision_aspect_ratio=aspect,
    )
    return _finish(model, tok, spec), proc


# ---------------------------------------------------------------------------------------- Qwen VL
QWEN_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
#: what stands for one image in a Qwen VL prompt (the processor expands the image pad)
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
#: a minimal chat template for the tiny processors (``chat: auto`` in a bench config)
QWEN_CHAT = ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
             + QWEN_IMAGE + "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
             "{% if add_generation_prompt %}assistant :{% endif %}")


@dataclass(kw_only=True)
class QwenSpec(_Sizes):
    """Sizes of a tiny random Qwen VL model (defaults: 4-px patches, 2-layer tower, 2-layer decoder).

    ``vision_intermediate``: the tower's MLP width (default ``2 * vision_hidden``); ``window``:
    Qwen2.5-VL's attention window in pixels (16: 4x4 patches) with the tower's last layer attending
    globally; ``min_pixels`` / ``max_pixels``: the processor's resize bounds.
    """

    vision_intermediate: int | None = None
    window: int = 16
    min_pixels: int = 16 * 16
    max_pixels: int = 96 * 96


def _qwen_processor(kind: str, spec: QwenSpec, tok: Any):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    common = dict(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, patch_size=spec.patch_size,
                  temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image = Qwen2VLImageProcessor(**common)
    if kind == "qwen3_vl":
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        video = Qwen3VLVideoProcessor(size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
                                      patch_size=spec.patch_size, temporal_patch_size=2, merge_size=2)
        return Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video, chat_template=QWEN_CHAT)
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    video = Qwen2VLVideoProcessor(**common)
    cls = Qwen2VLProcessor if kind == "qwen2_vl" else Qwen2_5_VLProcessor
    return cls(image_processor=image, tokenizer=tok, video_processor=video, chat_template=QWEN_CHAT)


def _random_qwen(kind: str, spec: QwenSpec | None, tokenizer: Any, overrides: dict[str, Any]):
    import transformers

    spec = QwenSpec(**overrides) if spec is None else spec
    tok = word_tokenizer(image_token="<|image_pad|>", specials=QWEN_SPECIALS) if tokenizer is None else tokenizer
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    head_dim = spec.text_hidden // spec.text_heads
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]  # temporal, height, width frequency pairs
    text = dict(_text_sizes(spec, len(tok), tok),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
    vision = dict(depth=spec.vision_layers, num_heads=spec.vision_heads, patch_size=spec.patch_size,
                  spatial_merge_size=2, temporal_patch_size=2)
    inter = spec.vision_intermediate or 2 * spec.vision_hidden
    if kind == "qwen2_vl":
        vision.update(embed_dim=spec.vision_hidden, hidden_size=spec.text_hidden,
                      mlp_ratio=max(1, inter // spec.vision_hidden))
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif kind == "qwen2_5_vl":
        vision.update(hidden_size=spec.vision_hidden, intermediate_size=inter,
                      out_hidden_size=spec.text_hidden, window_size=spec.window,
                      fullatt_block_indexes=[spec.vision_layers - 1])
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        vision.update(hidden_size=spec.vision_hidden, intermediate_size=inter,
                      out_hidden_size=spec.text_hidden, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
        text.update(head_dim=head_dim)
        text["rope_parameters"]["mrope_interleaved"] = True
        config_cls, model_cls = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    cfg = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    torch.manual_seed(spec.seed)
    model = model_cls(cfg)
    _generation_ids(model, tok)
    gen = model.generation_config
    gen.suppress_tokens = sorted(ids.values())  # a random model must not write image placeholders
    return model.eval(), _qwen_processor(kind, spec, tok)


def random_qwen2_vl(spec: QwenSpec | None = None, *, tokenizer: Any = None, **overrides: Any):
    """``(model, processor)``: a tiny random ``Qwen2VLForConditionalGeneration`` and its processor.

    Prompts hold :data:`QWEN_IMAGE` where an image goes. ``tokenizer``: a :func:`word_tokenizer`
    with ``image_token="<|image_pad|>"`` and ``specials=QWEN_SPECIALS`` (default: over DEFAULT_WORDS).
    """
    return _random_qwen("qwen2_vl", spec, tokenizer, overrides)


def random_qwen2_5_vl(spec: QwenSpec | None = None, *, tokenizer: Any = None, **overrides: Any):
    """``(model, processor)``: a tiny random ``Qwen2_5_VLForConditionalGeneration`` (window attention) and its processor."""
    return _random_qwen("qwen2_5_vl", spec, tokenizer, overrides)


def random_qwen3_vl(spec: QwenSpec | None = None, *, tokenizer: Any = None, **overrides: Any):
    """``(model, processor)``: a tiny random ``Qwen3VLForConditionalGeneration`` (DeepStack) and its processor."""
    return _random_qwen("qwen3_vl", spec, tokenizer, overrides)
