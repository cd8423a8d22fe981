"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: transformers' ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration`` and ``Qwen3VLForConditionalGeneration``.

Where operators run: **after the tower's 2x2 patch merger, on the tokens the language model
receives.** The tower (``model.model.visual``) packs every image of a call into one sequence of
patches (``cu_seqlens``; window attention in Qwen2.5-VL) and its merger maps each 2x2 block of
patches to one LLM-width token; vtc gets those tokens from the model's own
``get_image_features`` and lays each image out on its merged grid: ``index`` is the raster
position in the ``(h/2) x (w/2)`` grid (``image_grid_thw`` halved), ``Layout.grid(h/2, w/2)``.
Vision-stage and llm-stage operators both run there, in pipeline order (there is no separate
projector between them). Qwen3-VL's DeepStack features (merged tokens of intermediate tower
layers that the first decoder layers add to the visual positions) ride along as
``signals["deepstack"][j]`` (the features decoder layer ``j`` adds), so every keep or merge applies
to them as to the tokens.

The compacted prompt reaches the model through its own seam for precomputed image features
(``mm_encoder_outputs``): the forward gets the compacted ``input_ids`` and the kept tokens, and
scatters them (and DeepStack) itself. Positions are M-RoPE ``[3, B, L]``: ``position_ids=
"original"`` (the only mode) gives every kept visual token the ``(t, h, w)`` id of its grid cell and
every text token the id the model's ``get_rope_index`` gives it in the full prompt (text after an
image continues from the image's start plus ``max(h, w)/2``, whatever was kept), i.e. the ids of
the full prompt at the kept tokens' stock places. ``"contiguous"`` is not defined for M-RoPE:
renumbering would move visual tokens off their 2-D grid. Decoding continues from the prompt's
largest id plus one, as stock. No CLS token: operators reading ``cls_attn`` / ``cls_logits`` are
refused (the tower has none); videos are not compressed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vtc.errors import ConfigError, InputError, SignalError
from vtc.integrations.adapters import register_adapter
from vtc.integrations.adapters.base import Encoded, ModelAdapter
from vtc.integrations.compaction import Compaction, DecodeState
from vtc.integrations.signals import CLS_SIGNALS, SIGNAL_FREE, cls_free_advice, open_tap
from vtc.integrations.stages import replaces_projector
from vtc.tokens import Layout, VisualTokens

__all__ = ["QwenVLAdapter"]

DEEPSTACK = "deepstack"
#: how a per-patch signal becomes a merged token's (attention received is additive mass)
_MERGED_REDUCE = {"attn_received": "sum"}


@register_adapter
class QwenVLAdapter(ModelAdapter):
    family = "qwen_vl"
    class_names = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                   "Qwen3VLForConditionalGeneration")
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    position_modes = ("original",)
    default_position_ids = "original"
    tracks_every_prefill = True
    supports_llm_layer = True
    image_inputs = ("image_grid_thw", "mm_token_type_ids")

    # ------------------------------------------------------------------ parts
    @property
    def vision_tower(self) -> Any:
        return self.inner.visual

    @property
    def projector(self) -> Any:
        """The tower's patch merger (it runs inside the tower; operators run after it)."""
        return self.inner.visual.merger

    @property
    def deepstack_layers(self) -> int:
        return len(getattr(self.config.vision_config, "deepstack_visual_indexes", None) or ())

    def follow_layer_drops(self, stage: Any, handle: Any) -> None:
        """DeepStack (Qwen3-VL): the features the first decoder layers add at the visual positions
        (``_deepstack_process(hidden, visual_pos_masks, features)``) are mapped onto the visual tokens
        still alive, so tokens dropped after an earlier layer lose theirs and recycled ones get none."""
        lm = self.language_model
        original = getattr(lm, "_deepstack_process", None)
        if not self.deepstack_layers or original is None:
            return

        def deepstack(hidden_states: Tensor, visual_pos_masks: Tensor, visual_embeds: Tensor) -> Tensor:
            mask, rows = stage.follow(visual_pos_masks, visual_embeds)
            return original(hidden_states, mask, rows)

        handle.set_attr(lm, "_deepstack_process", deepstack)

    @property
    def merge(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def position_embeddings(self, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """M-RoPE ``(cos, sin)``: ``position_ids`` ``[3, B, L]`` (a leading text row ``[4, B, L]`` is
        dropped; 1-D ``[B, L]`` ids are used on all three axes, as the model does)."""
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, *position_ids.shape)
        elif position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        return self.rotary_embedding(hidden, position_ids)

    # ------------------------------------------------------------------ facts
    @classmethod
    def shape_from_config(cls, config: Any) -> Any:
        """A dynamic-resolution tower (patch embedding over ``temporal_patch_size`` frames, window
        attention in Qwen2.5-VL, SwiGLU MLP in Qwen2.5-VL), the 2x2 merger (and Qwen3-VL's DeepStack
        mergers) as the projector, a Qwen2/Qwen3 decoder with grouped-query attention."""
        from vtc.bench.flops import ModelShape, VisionShape, lm_shape

        vc, model_type = config.vision_config, config.model_type
        if model_type == "qwen2_vl":
            width, inter, out, gated = vc.embed_dim, vc.embed_dim * vc.mlp_ratio, vc.hidden_size, False
        else:
            width, inter, out = vc.hidden_size, vc.intermediate_size, vc.out_hidden_size
            gated = model_type == "qwen2_5_vl"
        m = vc.spatial_merge_size
        window, full = 0, ()
        if model_type == "qwen2_5_vl":
            window = vc.window_size // vc.patch_size  # window side in patches
            full = tuple(vc.fullatt_block_indexes)
        vision = VisionShape(
            layers=vc.depth, hidden=width, intermediate=inter, image_size=0, patch_size=vc.patch_size,
            channels=vc.in_channels, cls_token=False, temporal_patch=vc.temporal_patch_size, gated_mlp=gated,
            merge=m, window=window, full_attention_layers=full, heads=vc.num_heads, feature_layer=vc.depth - 1)
        mergers = 1 + len(getattr(vc, "deepstack_visual_indexes", ()) or ())
        merger = ((width * m * m, width * m * m), (width * m * m, out))
        return ModelShape(vision=vision, projector=merger * mergers, lm=lm_shape(config.text_config))

    def tower_grids(self, inputs: dict[str, Any]) -> list[list[tuple[int, int]]]:
        """The patch grid ``(h, w)`` of each image (``image_grid_thw``), per prompt."""
        thw = inputs.get("image_grid_thw")
        if thw is None:
            return [[] for _ in range(int(inputs["input_ids"].shape[0]))]
        grids = [(int(h), int(w)) for _, h, w in thw.tolist()]
        out, i = [], 0
        for n in self.images_per_prompt(inputs):
            out.append(grids[i:i + n])
            i += n
        return out

    # ------------------------------------------------------------------ binding
    def position_mode_error(self, mode: str) -> str:
        return (f"position_ids={mode!r} is not defined for {type(self.model).__name__}: its M-RoPE gives visual "
                "tokens 2-D (t, h, w) ids, which renumbering would move off the image grid. Use "
                "position_ids='original' (the default), which keeps the ids the model gives the full prompt")

    def bind(self, pipeline: Any, options: Any, handle: Any) -> None:
        super().bind(pipeline, options, handle)
        name = type(self.model).__name__
        for op in pipeline:
            if op.replaces_projector:
                raise ConfigError(
                    f"{op.name!r} replaces the projector, but {name}'s merger runs inside its vision tower and vtc "
                    f"runs operators after it; use an operator that keeps or merges tokens ({', '.join(SIGNAL_FREE)})")
        replaces_projector(pipeline)
        self.requires = pipeline.requires
        cls_needed = sorted(s for s in self.requires if s in CLS_SIGNALS)
        if cls_needed:
            readers = [op.name for op in pipeline if set(op.requires) & set(cls_needed)]
            raise SignalError(
                f"{', '.join(readers)} read{'s' if len(readers) == 1 else ''} {', '.join(cls_needed)}, the CLS token's "
                f"attention, but {name}'s vision tower has no CLS token. On Qwen VL models (operators run on the merged "
                f"grid) {cls_free_advice()}")
        self.tap = open_tap(self.vision_tower, self.requires, who=f"the pipeline {pipeline}", prefix=0)
        if self.tap is not None:
            handle.on_remove(self.tap.remove)

    def merged_signals(self, counts: list[int]) -> dict[str, dict[int, list[Tensor]]]:
        """The tap's signals of the last tower forward, per image, on the merged tokens."""
        from vtc.taps import to_merged_grid

        out: dict[str, dict[int, list[Tensor]]] = {}
        if self.tap is None:
            return out
        for name, layers in self.tap.requires.items():
            reduce = _MERGED_REDUCE.get(name, "mean")
            out[name] = {}
            for layer in layers:
                per_image = [to_merged_grid(t, self.merge, reduce) for t in self.tap.per_image(name, layer)]
                if [int(t.shape[0]) for t in per_image] != counts:
                    raise SignalError(f"the tap recorded {name}[{layer}] for {[int(t.shape[0]) for t in per_image]} "
                                      f"merged tokens but the images have {counts}")
                out[name][layer] = per_image
        return out

    # ------------------------------------------------------------------ images -> tokens
    def encode(self, kw: dict[str, Any]) -> Encoded:
        if kw.get("pixel_values_videos") is not None:
            raise InputError("vtc.apply compresses images; this call brings videos (pixel_values_videos), which it "
                             "does not support yet")
        thw = kw.get("image_grid_thw")
        if thw is None:
            raise InputError("Qwen VL needs image_grid_thw (the processor returns it) to lay out its images")
        if bool((thw[:, 0] != 1).any()):
            raise InputError(f"vtc compresses still images (grid t = 1); got image_grid_thw {thw.tolist()}")
        m = self.merge
        grids = [(int(h) // m, int(w) // m) for _, h, w in thw.tolist()]
        out = self.inner.get_image_features(kw["pixel_values"], thw, return_dict=True)
        feats = list(out.pooler_output)
        signals = self.merged_signals([int(f.shape[0]) for f in feats])
        deep = getattr(out, "deepstack_features", None)
        if deep:
            signals[DEEPSTACK] = {j: list(per_image) for j, per_image in enumerate(deep)}
        tokens = VisualTokens.from_list(feats, layout=[Layout.grid(h, w) for h, w in grids], signals=signals,
                                        layer_space=None if self.tap is None else self.tap.layer_space)
        if tokens.dim != self.text_width:
            raise InputError(f"the merger gave {tokens.dim}-wide tokens; the language model takes {self.text_width}")
        compressed = self.run_pipeline(tokens, None, out_dim=self.text_width)
        return Encoded(compressed, [h * w for h, w in grids], {"grids": grids, "output_type": type(out)})

    def language_inputs(self, kw: dict[str, Any], ids: Tensor, encoded: Encoded) -> dict[str, Any]:
        """The compacted ``input_ids`` and the kept tokens as the model's precomputed image features
        (``mm_encoder_outputs``): the model scatters them, and Qwen3-VL's DeepStack, itself."""
        tokens = encoded.tokens
        counts = tokens.counts.tolist()
        fields: dict[str, Any] = {"pooler_output": tuple(tokens.unbind())}
        if DEEPSTACK in tokens.signals:
            per_layer = tokens.signals[DEEPSTACK]
            fields["deepstack_features"] = [tuple(per_layer[j][b, :n] for b, n in enumerate(counts))
                                            for j in sorted(per_layer)]
        image = encoded.extra["output_type"](**fields)  # the class the model's get_image_features returns
        out: dict[str, Any] = {"input_ids": ids, "inputs_embeds": None, "pixel_values": None,
                               "mm_encoder_outputs": {"image": image}}
        for name in self.image_inputs:
            if name in kw:
                out[name] = None
        return out

    def report_features(self, output: Any, encoded: Encoded) -> None:
        """Nothing to do: the model reports the image features it was given (the kept tokens)."""

    # ------------------------------------------------------------------ M-RoPE positions
    def rope_index(self, kw: dict[str, Any]) -> Tensor:
        """``[3, B, L]``: the model's own M-RoPE ids of the full (uncompacted) prompt."""
        ids = kw["input_ids"]
        types = kw.get("mm_token_type_ids")
        if types is None:
            cfg = self.config
            types = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
        pos, _ = self.inner.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=kw.get("image_grid_thw"),
                                           attention_mask=kw.get("attention_mask"))
        return pos

    def _full_positions(self, kw: dict[str, Any]) -> Tensor:
        given = kw.get("position_ids")
        if given is None:
            return self.rope_index(kw)
        L = kw["input_ids"].shape[1]
        if given.dim() != 3 or given.shape[0] not in (3, 4) or given.shape[-1] != L:
            raise InputError(f"Qwen VL position_ids must be [3 or 4, batch, {L}] (M-RoPE, as the model's "
                             f"get_rope_index and generate() build them), got {tuple(given.shape)}")
        return given

    def prefill_positions(self, kw: dict[str, Any], plan: Compaction, encoded: Encoded) -> Tensor:
        full = self._full_positions(kw)
        encoded.extra["positions"] = full  # the full prompt's ids, for decode_state
        src = plan.token_source(encoded.tokens.index)
        return self.rebuild_positions(full, src)

    def decode_state(self, kw: dict[str, Any], plan: Compaction, call: dict[str, Any], encoded: Encoded) -> DecodeState:
        full = encoded.extra["positions"]
        mask = kw.get("attention_mask")
        rows = full[-3:]
        if mask is not None:
            rows = rows.masked_fill(~mask.bool().unsqueeze(0), torch.iinfo(rows.dtype).min)
        state = super().decode_state(kw, plan, call, encoded)
        state.next_position = rows.amax(dim=(0, 2)) + 1
        return state

    def decode_positions(self, state: DecodeState, position_ids: Tensor | None, cache_len: int, q: int,
                         device: torch.device) -> Tensor:
        """The caller's ids (``generate()`` continues the full prompt's), else the prompt's largest id
        plus one, plus the tokens decoded since, on all three axes."""
        if position_ids is not None:
            return position_ids
        new = cache_len - state.compact_length
        step = torch.arange(q, device=device) + new
        pos = state.next_position.to(device).unsqueeze(1) + step
        return pos.unsqueeze(0).expand(3, *pos.shape)
