"""The ModelAdapter contract: everything vtc needs to know about one model family.

An adapter wraps one model instance and never modifies it. It answers four kinds of questions:

- **Where the parts are**: :attr:`~ModelAdapter.vision_tower`, :attr:`~ModelAdapter.projector`,
  :attr:`~ModelAdapter.language_model` (the decoder stack), :attr:`~ModelAdapter.decoder_layers`,
  :meth:`~ModelAdapter.attention` (layer ``l``'s attention module, where post-RoPE q/k can be
  captured), :meth:`~ModelAdapter.position_embeddings` (the rotary cos/sin for given position ids),
  :attr:`~ModelAdapter.lm_head`, :meth:`~ModelAdapter.cache_layer` (how the KV cache is read), and
  :meth:`~ModelAdapter.shape` (the sizes FLOPs depend on). The bench, FLOPs, latency and the
  embedded models' forward read them here, never by attribute paths of their own.
- **How images become tokens**: :meth:`~ModelAdapter.encode` runs the tower (with the pipeline's
  tap), lays the tokens out (grid, partitions, layout) and runs the pipeline's stages; it returns
  the compressed LLM-width :class:`~vtc.tokens.VisualTokens` (one row per image, in the order
  the images' placeholder runs appear in ``input_ids``) and how many placeholders stock puts in
  ``input_ids`` for each image.
- **How the compacted prompt reaches the language model**: :meth:`~ModelAdapter.language_inputs`
  (``inputs_embeds``, or the model's own seam for precomputed image features),
  :meth:`~ModelAdapter.prefill_positions` / :meth:`~ModelAdapter.decode_positions` (position ids
  after compaction, 1-D or M-RoPE ``[3, B, L]``; the modes in :attr:`~ModelAdapter.position_modes`)
  and :meth:`~ModelAdapter.rebuild_positions` (what positions become when tokens are removed
  inside the language model, for the ``llm_layer`` stage).
- **Which pipelines it can run**: :meth:`~ModelAdapter.bind` validates a pipeline against the
  family (signals the tower can give, projector-replacing operators) and opens the taps.

The generic machinery (wrapping ``forward``, compaction, decoding over a compacted cache) is
:mod:`vtc.integrations.wrapper`; it calls only these methods. The defaults here describe a
LLaVA-style model (``model.model.vision_tower`` / ``multi_modal_projector`` / ``language_model``,
1-D positions); a family overrides what differs. A new family is one adapter file registered in
:mod:`vtc.integrations.adapters` (see ``vtc/integrations/README.md``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from vtc.errors import ConfigError, UnsupportedModelError
from vtc.integrations.compaction import Compaction, DecodeState
from vtc.integrations.kv_cache import cache_in, cache_length, cache_out

if TYPE_CHECKING:
    from vtc.bench.flops import ModelShape
    from vtc.integrations.handle import Handle
    from vtc.integrations.options import ApplyOptions
    from vtc.pipeline import Pipeline
    from vtc.tokens import VisualTokens

__all__ = ["ModelAdapter", "Encoded", "transformers_classes"]


def transformers_classes(*names: str) -> tuple[type, ...]:
    """The transformers classes called ``names`` that this install has (imported lazily)."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - depends on the install
        return ()
    return tuple(getattr(transformers, n) for n in names if hasattr(transformers, n))


@dataclass
class Encoded:
    """What :meth:`ModelAdapter.encode` returns for the images of one call.

    ``tokens``: compressed LLM-width tokens, one row per image, in the order of the images'
    placeholder runs; ``stock``: placeholders stock puts in ``input_ids`` for each image;
    ``extra``: family facts later steps need (e.g. Qwen's grids).
    """

    tokens: VisualTokens
    stock: list[int]
    extra: dict[str, Any] = field(default_factory=dict)
    #: tokens each image kept, on the host (the wrapper sets it from the compaction's one sync)
    kept: list[int] | None = None
    _flat: Tensor | None = field(default=None, repr=False)

    def features(self) -> Tensor:
        """``[sum of kept, D]``: every image's kept tokens, image after image (what fills the
        placeholders). No host sync once :attr:`kept` is known."""
        if self._flat is None:
            t = self.tokens
            x = t.x.reshape(-1, t.x.shape[-1])
            if t.mask is None:
                self._flat = x
            elif self.kept is None:
                self._flat = t.x[t.mask]
            else:  # valid tokens first, in order, without a data-dependent shape
                order = torch.argsort((~t.mask).reshape(-1).to(torch.uint8), stable=True)
                self._flat = x[order[:sum(self.kept)]]
        return self._flat


class ModelAdapter(ABC):
    """One model family (see the module docstring). ``family``: its name in messages and the registry;
    ``class_names``: the transformers classes it serves (subclasses included)."""

    family: ClassVar[str]
    class_names: ClassVar[tuple[str, ...]]
    #: position-id modes after compaction this family supports, and its default
    position_modes: ClassVar[tuple[str, ...]] = ("contiguous", "original")
    default_position_ids: ClassVar[str] = "contiguous"
    #: whether every prefill keeps a decode state (positions need it even when nothing was dropped)
    tracks_every_prefill: ClassVar[bool] = False
    #: whether this family runs ``llm_layer`` operators inside its decoder (the in-LLM stage)
    supports_llm_layer: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.pipeline: Pipeline | None = None
        self.options: ApplyOptions | None = None
        self.tap: Any = None
        #: whether a call already validated the pipeline's input (later calls run fast)
        self.validated = False

    # ------------------------------------------------------------------ which models
    @classmethod
    def model_classes(cls) -> tuple[type, ...]:
        return transformers_classes(*cls.class_names)

    @classmethod
    def matches(cls, model: Any) -> bool:
        """Whether ``model`` is an instance of one of :attr:`class_names` (subclasses included)."""
        classes = cls.model_classes()
        return bool(classes) and isinstance(model, classes)

    # ------------------------------------------------------------------ parts
    @property
    def inner(self) -> nn.Module:
        """The base model inside the ``...ForConditionalGeneration`` wrapper."""
        return self.model.model

    @property
    def vision_tower(self) -> nn.Module:
        return self.inner.vision_tower

    @property
    def projector(self) -> nn.Module | None:
        """The module mapping tower features to the LLM's width (None if the tower does it)."""
        return self.inner.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (embeddings, ``layers``, final norm, rotary embedding), without the LM head."""
        return self.inner.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    def attention(self, layer: int) -> nn.Module:
        """Decoder layer ``layer``'s self-attention module (its forward sees q/k after RoPE through
        transformers' attention interface)."""
        return self.decoder_layers[layer].self_attn

    @property
    def deepstack_layers(self) -> int:
        """How many leading decoder layers add visual features at the visual positions after they run
        (Qwen3-VL's DeepStack; 0 for most families). Removing visual tokens inside the language
        model before these layers must remove the same rows of those features."""
        return 0

    def follow_layer_drops(self, stage: Any, handle: Handle) -> None:
        """Make what the decoder adds at given positions after some layers (Qwen3-VL's DeepStack)
        follow the tokens the in-LLM stage removes (``stage.follow(mask0, rows)`` maps them onto the
        surviving positions); changes go through ``handle``. Nothing to do for most families."""
        return None

    @property
    def rotary_embedding(self) -> nn.Module:
        return self.language_model.rotary_emb

    def position_embeddings(self, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The rotary ``(cos, sin)`` the decoder layers receive for ``position_ids`` (as the model builds them)."""
        return self.rotary_embedding(hidden, position_ids)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @staticmethod
    def cache_layer(cache: Any, layer: int) -> tuple[Tensor, Tensor]:
        """``(keys, values)`` ``[B, kv_heads, T, head_dim]`` that ``cache`` holds for decoder layer ``layer``."""
        layers = getattr(cache, "layers", None)
        if layers is None:
            raise UnsupportedModelError(f"cannot read the KV cache {type(cache).__name__}: it has no per-layer entries")
        entry = layers[layer]
        return entry.keys, entry.values

    cache_in = staticmethod(cache_in)
    cache_out = staticmethod(cache_out)
    cache_length = staticmethod(cache_length)

    # ------------------------------------------------------------------ config facts
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def image_token_id(self) -> int:
        cfg = self.config
        token_id = getattr(cfg, "image_token_id", None)
        return int(cfg.image_token_index if token_id is None else token_id)

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.config.text_config, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    @property
    def text_width(self) -> int:
        return int(self.config.text_config.hidden_size)

    #: ``config.model_type`` values of the family (so FLOPs can read a bare config)
    model_types: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def shape_from_config(cls, config: Any) -> ModelShape:
        """The sizes the analytic FLOPs depend on (:class:`vtc.bench.flops.ModelShape`): a CLIP/SigLIP
        tower, a two-layer MLP projector over the feature layer(s), a Llama-style decoder."""
        from vtc.bench.flops import ModelShape, lm_shape, vision_shape
        from vtc.errors import TapError
        from vtc.taps.layers import hidden_state_layer

        layers = getattr(config, "vision_feature_layer", -2)
        n_layers = len(layers) if isinstance(layers, (list, tuple)) else 1
        last = layers[-1] if isinstance(layers, (list, tuple)) else layers  # the layer "feature" names
        try:
            feature = hidden_state_layer(int(last), config.vision_config.num_hidden_layers)
        except TapError:  # the embeddings: no layer's output (the taps' FLOPs then cannot resolve "feature")
            feature = None
        vision = vision_shape(config.vision_config, feature_layer=feature)
        lm = lm_shape(config.text_config)
        return ModelShape(vision=vision, projector=((vision.hidden * n_layers, lm.hidden), (lm.hidden, lm.hidden)),
                          lm=lm)

    def shape(self) -> ModelShape:
        return self.shape_from_config(self.config)

    def tower_grids(self, inputs: dict[str, Any]) -> list[list[tuple[int, int]]]:
        """Per prompt of a processor batch ``inputs``, the patch grid ``(h, w)`` of every vision-tower
        forward its images take (FLOPs of the tower): here one fixed-size pass per image."""
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        return [[(side, side)] * n for n in self.images_per_prompt(inputs)]

    def images_per_prompt(self, inputs: dict[str, Any]) -> list[int]:
        """How many images each prompt of ``inputs`` holds (runs of placeholder tokens)."""
        ids = inputs["input_ids"]
        ph = ids == self.image_token_id
        starts = ph & ~torch.nn.functional.pad(ph, (1, 0))[:, :-1]
        return [int(v) for v in starts.sum(1).tolist()]

    # ------------------------------------------------------------------ binding a pipeline
    def bind(self, pipeline: Pipeline, options: ApplyOptions, handle: Handle) -> None:
        """Check that this family can run ``pipeline`` with ``options`` and prepare for it (taps, ...).

        Raises before anything is attached; what it attaches goes through ``handle`` so
        ``handle.remove()`` undoes it.
        """
        mode = self.position_mode(options)
        if mode not in self.position_modes:
            raise ConfigError(self.position_mode_error(mode))
        inside = [op.name for op in pipeline if op.stage == "llm_layer"]
        if inside and not self.supports_llm_layer:
            raise ConfigError(
                f"{', '.join(inside)} run{'s' if len(inside) == 1 else ''} inside the language model (stage "
                f"'llm_layer'), which vtc.apply does not integrate on {type(self.model).__name__} yet; use operators "
                "that run before the language model")
        self.pipeline, self.options = pipeline, options
        self.validated = not pipeline.validate  # a Pipeline(validate=False) is never checked

    def run_pipeline(self, tokens: VisualTokens, projector: Any, **kwargs: Any) -> VisualTokens:
        """:func:`~vtc.integrations.stages.run_stages` with the validate-once rule: the first call of
        this handle checks each stage's input once (and the operators' structure), later calls run
        in fast mode, without any check or host sync of their own."""
        from vtc.integrations.stages import run_stages

        out = run_stages(self.pipeline, tokens, projector, fast=self.validated, **kwargs)
        self.validated = True
        return out

    def position_mode(self, options: ApplyOptions) -> str:
        return options.position_ids or self.default_position_ids

    def position_mode_error(self, mode: str) -> str:
        return (f"{self.family} supports position_ids in {self.position_modes}, not {mode!r}")

    @property
    def mode(self) -> str:
        return self.position_mode(self.options)

    # ------------------------------------------------------------------ images -> tokens
    @abstractmethod
    def encode(self, kw: dict[str, Any]) -> Encoded:
        """Compress the images of a forward call's keyword arguments ``kw`` (see :class:`Encoded`)."""

    # ------------------------------------------------------------------ the compacted call
    def language_inputs(self, kw: dict[str, Any], ids: Tensor, encoded: Encoded) -> dict[str, Any]:
        """Keyword arguments that replace ``kw``'s in the call of the model's own forward on the
        compacted prompt ``ids``: here ``inputs_embeds`` with the kept visual tokens scattered into
        the placeholders, and no image inputs."""
        embeds = self.embeddings(ids)
        feats = encoded.features().to(embeds.device, embeds.dtype)
        slots = (ids == self.image_token_id).unsqueeze(-1).to(embeds.device)
        out: dict[str, Any] = {"input_ids": None, "inputs_embeds": embeds.masked_scatter(slots, feats),
                               "pixel_values": None}
        for name in self.image_inputs:
            if name in kw:
                out[name] = None
        return out

    #: keyword arguments of the model's forward that describe the images (dropped after encoding)
    image_inputs: ClassVar[tuple[str, ...]] = ("image_sizes",)

    def report_features(self, output: Any, encoded: Encoded) -> None:
        """Report the visual features the language model received where stock reports its image features."""
        feats = encoded.features()
        fields = getattr(type(output), "__dataclass_fields__", {})
        if "image_hidden_states" in fields:  # transformers < 5.24
            output.image_hidden_states = feats
        elif "image_outputs" in fields:  # 5.24 on, where reading image_hidden_states is deprecated
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            output.image_outputs = BaseModelOutputWithPooling(pooler_output=feats)

    # ------------------------------------------------------------------ positions
    def prefill_positions(self, kw: dict[str, Any], plan: Compaction, encoded: Encoded) -> Tensor | None:
        """Position ids of the compacted prompt (None: leave the caller's / the model's default).

        1-D: ``"contiguous"`` renumbers without gaps, ``"original"`` keeps each surviving token's id
        (:meth:`Compaction.position_ids`).
        """
        if not plan.changed:
            return None
        return plan.position_ids(kw.get("position_ids"), self.mode)

    def decode_state(self, kw: dict[str, Any], plan: Compaction, call: dict[str, Any], encoded: Encoded) -> DecodeState:
        """What decoding steps after this prefill need (kept per KV cache)."""
        return DecodeState(prompt_length=plan.keep.shape[1], compact_length=plan.length,
                           prompt_mask=call.get("attention_mask"), dropped=plan.dropped, mode=self.mode,
                           dropped_any=plan.changed)

    def decode_positions(self, state: DecodeState, position_ids: Tensor | None, cache_len: int, q: int,
                         device: torch.device) -> Tensor | None:
        """Position ids of ``q`` new tokens after a compacted prefill (``position_ids``: the caller's)."""
        return state.position_ids(position_ids, cache_len, q, device)

    @staticmethod
    def rebuild_positions(position_ids: Tensor, src: Tensor) -> Tensor:
        """Position ids after tokens are removed inside the language model: slot ``k`` of row ``b``
        holds the token that was at position ``src[b, k]`` and keeps its id (the rule of FastV's code
        and of M-RoPE models). Works on 1-D ``[B, L]`` and M-RoPE ``[R, B, L]`` ids alike."""
        lead = position_ids.shape[:-2]
        B, K = src.shape
        full = position_ids.expand(*lead, B, position_ids.shape[-1])
        return full.gather(-1, src.expand(*lead, B, K))
