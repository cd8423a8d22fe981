"""Analytic FLOPs of a LLaVA-style model from its config and the token counts of each stage.

Counts are matrix-multiply FLOPs (1 multiply-add = 2 FLOPs), the convention of
``torch.utils.flop_counter.FlopCounterMode``; norms, activations, softmax and RoPE are not counted.
Stages:

- **vision**: the tower's patch embedding (a convolution) and every encoder layer (Hugging Face
  runs all of them even though LLaVA reads layer -2), once per tower pass (LLaVA-NeXT: once per
  AnyRes partition; dynamic-resolution towers such as Qwen VL's: once per image, on its own patch
  grid). Attention is counted as the full ``N x N`` products per pass, or per window in the
  window-attention layers of Qwen2.5-VL's tower.
- **projector**: each linear layer of the multimodal projector over the tokens it sees (Qwen VL:
  the 2x2 merger, and Qwen3-VL's DeepStack mergers, over the merged tokens; operators then see the
  merged, LLM-width tokens).
- **ops**: each operator's own work, from its optional ``flops(n_in, dim, partitions)`` method,
  else from the estimate for its name in :data:`OP_FLOPS` (model knowledge stays here, not in
  the operators), plus the cost of the taps that record its signals (:func:`tap_flops`: the CLS
  row of each recorded layer, every query row against every key for ``attn_received``, and the
  projections a tap recomputes on towers whose attention fuses them).
- **prefill**: the LLM over ``n`` prompt tokens: q/k/v/o projections with grouped-query
  attention (``n_kv_heads``), the full ``n x n`` attention products (as FlopCounterMode and FastV
  count them; causal kernels skip about half), SwiGLU's three matrices (two for a plain MLP), and
  the LM head for the logits actually computed (``generate`` computes only the last position).
- **decode**: one step per generated token after the first, each attending to the whole cache.

In-LLM operators (stage ``llm_layer``: FastV, PyramidDrop, AIM, SparseVLM) make the token count
differ per decoder layer: every LLM figure then counts each layer at the tokens it actually
processed (``layer_tokens``: prefill over ``n_l`` tokens, decode against a cache of ``n_l + t``,
KV-cache bytes per layer). :func:`layer_visual_counts` predicts the visual tokens of each layer
from the operators' own counting rule (``kept_visual``), or the integration passes the measured
counts; :func:`equivalent_tokens` is their layer average, the "equivalent tokens" SparseVLM and
PyramidDrop report, next to the visual tokens at the LLM input.

Also :func:`fastv_compat`, the figure FastV and DivPrune publish (``T·(4nd² + 2n²d + 2ndm)``, LLM
only, one forward over ``n`` tokens; with in-LLM pruning FastV's own ``FLOPs(n, K layers) +
FLOPs(n', T-K layers)``, i.e. each layer at its count), and :func:`kv_cache_bytes`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vtc.errors import ConfigError
from vtc.taps.tap import CLS_SIGNALS

__all__ = ["VisionShape", "LMShape", "ModelShape", "vision_shape", "lm_shape", "vision_flops", "projector_flops",
           "prefill_flops", "decode_flops", "fastv_compat", "kv_cache_bytes", "op_flops", "pipeline_flops", "tap_flops",
           "estimate", "OP_FLOPS",
           "register_op_flops", "layer_visual_counts", "equivalent_tokens"]


@dataclass(frozen=True)
class VisionShape:
    """A ViT tower: ``layers`` encoder layers of width ``hidden`` on ``image_size / patch_size``² patches.

    ``image_size=0``: a dynamic-resolution tower, whose patch grids come with each question.
    ``temporal_patch``: frames per patch of the embedding (Qwen VL: 2); ``gated_mlp``: a SwiGLU
    MLP (three matrices); ``merge``: the side of the patch blocks merged into one LLM token (2
    for Qwen VL; operators then run on merged tokens); ``window``: the side in patches of the
    attention windows, in every layer but ``full_attention_layers`` (Qwen2.5-VL; 0: none).
    For the taps' cost (:func:`tap_flops`): ``heads`` (attention heads; 0: unknown),
    ``feature_layer`` (the layer the model reads features from, non-negative, resolving
    ``"feature"``; None: unknown) and ``fused_qkv`` (the attention projects q/k/v inside one fused
    call, as open_clip's ``nn.MultiheadAttention``, so a tap re-projects the q/k it needs).
    """

    layers: int
    hidden: int
    intermediate: int
    image_size: int
    patch_size: int
    channels: int = 3
    cls_token: bool = True
    pool_head: bool = False  # SigLIP's attention-pooling head
    temporal_patch: int = 1
    gated_mlp: bool = False
    merge: int = 1
    window: int = 0
    full_attention_layers: tuple[int, ...] = ()
    heads: int = 0
    feature_layer: int | None = None
    fused_qkv: bool = False

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq(self) -> int:
        return self.patches + int(self.cls_token)

    def grid(self) -> tuple[int, int]:
        """The fixed patch grid of one pass (raises for a dynamic-resolution tower)."""
        if not self.image_size:
            raise ConfigError("this tower takes images of any size: give the patch grid of each pass (grids=)")
        side = self.image_size // self.patch_size
        return side, side


@dataclass(frozen=True)
class LMShape:
    """A decoder-only LLM (Llama / Vicuna / Mistral / Qwen2 shapes)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool = True  # SwiGLU: gate, up, down


@dataclass(frozen=True)
class ModelShape:
    """Everything FLOPs depend on: tower, projector linears ``(in, out)``, LLM."""

    vision: VisionShape | None
    projector: tuple[tuple[int, int], ...]
    lm: LMShape | None

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read a Hugging Face config: a model family's (through its adapter,
        :meth:`vtc.integrations.adapters.ModelAdapter.shape_from_config`), a bare text config, or a
        bare vision config."""
        if getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None:
            from vtc.integrations.adapters import adapter_class_for_config
            from vtc.integrations.adapters.base import ModelAdapter

            return (adapter_class_for_config(config) or ModelAdapter).shape_from_config(config)
        if hasattr(config, "patch_size"):
            return cls(vision=vision_shape(config), projector=(), lm=None)
        return cls(vision=None, projector=(), lm=lm_shape(config))

    @classmethod
    def from_model(cls, model: Any) -> ModelShape:
        """The shapes of a model instance, read by its adapter."""
        from vtc.integrations.adapters import adapter_for

        return adapter_for(model).shape()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def vision_shape(c: Any, feature_layer: int | None = None) -> VisionShape:
    """A CLIP / SigLIP vision config's shape; ``feature_layer``: the tower layer the model reads."""
    model_type = getattr(c, "model_type", "")
    siglip = "siglip" in model_type
    return VisionShape(
        layers=c.num_hidden_layers, hidden=c.hidden_size, intermediate=c.intermediate_size,
        image_size=c.image_size, patch_size=c.patch_size, channels=getattr(c, "num_channels", 3),
        cls_token=not siglip, pool_head=siglip and bool(getattr(c, "vision_use_head", True)),
        heads=getattr(c, "num_attention_heads", 0) or 0, feature_layer=feature_layer,
    )


def lm_shape(c: Any) -> LMShape:
    """A decoder-only text config's shape (Llama / Mistral / Qwen2 style)."""
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    act = getattr(c, "hidden_act", "silu")
    gated = getattr(c, "model_type", "llama") not in ("gpt2", "opt", "phi") and act in ("silu", "swish", "gelu_pytorch_tanh")
    return LMShape(
        layers=c.num_hidden_layers, hidden=c.hidden_size, intermediate=c.intermediate_size, heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=head_dim, vocab=c.vocab_size,
        gated_mlp=gated,
    )


# ------------------------------------------------------------------------- stages
def _attention_blocks(v: VisionShape, h: int, w: int) -> tuple[int, int]:
    """``(sum of n² over one pass, sum of n² over its windows)`` for an ``h x w`` patch grid.

    Windows tile the merged grid in ``window/merge``-token squares from the top-left corner
    (the last row and column of windows may be smaller), as transformers' ``get_vision_window_index``.
    """
    n = h * w + int(v.cls_token)
    if not v.window:
        return n * n, n * n
    side = v.window // v.merge
    hm, wm = h // v.merge, w // v.merge

    def squares(length: int) -> int:
        return (length // side) * side * side + (length % side) ** 2

    return n * n, v.merge**4 * squares(hm) * squares(wm)


def vision_flops(v: VisionShape, passes: int = 1, grids: list[tuple[int, int]] | None = None) -> int:
    """FLOPs of ``passes`` tower forwards (one per image, or per AnyRes partition), or of one pass per
    patch grid ``(h, w)`` in ``grids`` (dynamic-resolution towers)."""
    grids = [v.grid()] * passes if grids is None else grids
    d, m = v.hidden, v.intermediate
    global_layers = len(v.full_attention_layers) if v.window else v.layers
    total = 0
    for h, w in grids:
        p = h * w
        n = p + int(v.cls_token)
        embed = 2 * p * v.channels * v.temporal_patch * v.patch_size**2 * d
        dense = 2 * n * d * 4 * d + 2 * n * d * m * (3 if v.gated_mlp else 2)
        full, windows = _attention_blocks(v, h, w)
        attn = 2 * 2 * d * (global_layers * full + (v.layers - global_layers) * windows)
        head = 0
        if v.pool_head:  # probe query attends over the N patch tokens, then an MLP on one token
            head = 2 * d * d + 2 * n * d * 2 * d + 2 * 2 * n * d + 2 * d * d + 2 * 2 * d * m
        total += embed + v.layers * dense + attn + head
    return total


def projector_flops(shape: ModelShape, tokens: int) -> int:
    """FLOPs of the multimodal projector over ``tokens`` vision features."""
    return sum(2 * tokens * i * o for i, o in shape.projector)


def _lm_layer(lm: LMShape, n: int, context: int) -> int:
    """One decoder layer over ``n`` new tokens attending to ``context`` tokens (cache included)."""
    d, hd = lm.hidden, lm.head_dim
    proj = 2 * n * d * (lm.heads * hd) * 2 + 2 * n * d * (lm.kv_heads * hd) * 2  # q, o + k, v
    attn = 2 * 2 * n * context * lm.heads * hd
    mlp = 2 * n * d * lm.intermediate * (3 if lm.gated_mlp else 2)
    return proj + attn + mlp


def _per_layer(lm: LMShape, n: int, layer_tokens: Sequence[int] | None) -> list[int]:
    """Tokens each decoder layer processes: ``layer_tokens`` (checked), or ``n`` in every layer."""
    if layer_tokens is None:
        return [n] * lm.layers
    out = [int(v) for v in layer_tokens]
    if len(out) != lm.layers:
        raise ConfigError(f"layer_tokens has {len(out)} entries but the language model has {lm.layers} layers")
    return out


def prefill_flops(lm: LMShape, n: int, logits: int = 1, layer_tokens: Sequence[int] | None = None) -> int:
    """FLOPs of one LLM forward over ``n`` prompt tokens, computing ``logits`` positions of the LM head.

    ``layer_tokens[l]``: tokens decoder layer ``l`` processes when in-LLM operators drop tokens
    between layers (default ``n`` everywhere).
    """
    return sum(_lm_layer(lm, t, t) for t in _per_layer(lm, n, layer_tokens)) + 2 * logits * lm.hidden * lm.vocab


def decode_flops(lm: LMShape, prompt: int, new_tokens: int, layer_tokens: Sequence[int] | None = None) -> int:
    """FLOPs of the decode steps after a prefill of ``prompt`` tokens that end with ``new_tokens`` generated.

    The prefill yields the first token; each later token costs one step over a cache of
    ``prompt + t`` tokens (``t = 1 .. new_tokens - 1``), with the LM head on one position. With
    ``layer_tokens``, layer ``l``'s cache holds ``layer_tokens[l] + t`` tokens.
    """
    per = _per_layer(lm, prompt, layer_tokens)
    total = 0
    for t in range(1, max(new_tokens, 1)):
        total += sum(_lm_layer(lm, 1, c + t) for c in per) + 2 * lm.hidden * lm.vocab
    return total


def fastv_compat(lm: LMShape, n: int, layer_tokens: Sequence[int] | None = None) -> int:
    """``T·(4·n·d² + 2·n²·d + 2·n·d·m)``: the LLM-only figure FastV and DivPrune publish as "FLOPs";
    with ``layer_tokens``, the sum of that per-layer term at each layer's count (FastV's own formula
    for pruning inside the LLM)."""
    d, m = lm.hidden, lm.intermediate
    return sum(4 * t * d * d + 2 * t * t * d + 2 * t * d * m for t in _per_layer(lm, n, layer_tokens))


def kv_cache_bytes(lm: LMShape, tokens: int, bytes_per_element: int = 2,
                   layer_tokens: Sequence[int] | None = None) -> int:
    """Bytes of the K and V caches for ``tokens`` positions (``layer_tokens[l]`` in layer ``l``)."""
    return sum(2 * lm.kv_heads * lm.head_dim * t * bytes_per_element for t in _per_layer(lm, tokens, layer_tokens))


def layer_visual_counts(pipeline: Any, visual: int, num_layers: int) -> list[int] | None:
    """Visual tokens each decoder layer processes, predicted from the pipeline's ``llm_layer`` operators.

    ``visual`` tokens enter the LLM; after each layer the operators scheduled there (in pipeline
    order) apply their counting rule ``kept_visual`` (the same rule their decisions follow), so the
    next layer sees that many. None when the pipeline has no in-LLM operator.
    """
    if pipeline is None or not hasattr(pipeline, "layer_schedule") or not pipeline.has_stage("llm_layer"):
        return None
    import torch

    schedule = pipeline.layer_schedule(num_layers)
    n_in = torch.tensor([int(visual)])
    alive = n_in.clone()
    out = []
    for layer in range(num_layers):
        out.append(int(alive))
        for op in schedule.get(layer, []):
            alive = op.kept_visual(layer, alive, n_in, num_layers)
    return out


def equivalent_tokens(layer_visual: Sequence[int]) -> float:
    """The layer average of the visual token counts: SparseVLM's and PyramidDrop's "equivalent tokens"."""
    return sum(layer_visual) / len(layer_visual) if len(layer_visual) else 0.0


# ------------------------------------------------------------------------- operators
OpFlops = Callable[[Any, int, int, int], tuple[int, int]]
#: name -> ``f(op, n_in, dim, partitions) -> (flops, n_out)`` per image
OP_FLOPS: dict[str, OpFlops] = {}


def register_op_flops(name: str):
    """Register the FLOPs estimate of the operator ``name`` (decorator)."""

    def deco(fn: OpFlops) -> OpFlops:
        OP_FLOPS[name] = fn
        return fn

    return deco


def _budget(op: Any, n_in: int, partitions: int = 1) -> int:
    cfg = getattr(op, "config", None)
    keep, ratio = getattr(cfg, "keep", None), getattr(cfg, "ratio", None)
    if keep is None and ratio is None:
        ratio = getattr(op, "default_ratio", None)  # e.g. HiRED's 0.2 when no budget is given
    if keep is not None:
        return min(int(keep), n_in)
    if ratio is not None:
        return max(1, round(n_in * float(ratio)))
    return n_in


@register_op_flops("divprune")
def _divprune(op: Any, n: int, d: int, p: int) -> tuple[int, int]:
    # row normalisation (n·d), the n x n cosine matrix (2·n²·d); the greedy max-min loop compares only
    return 2 * n * n * d + 2 * n * d, _budget(op, n, p)


@register_op_flops("tome")
def _tome(op: Any, n: int, d: int, p: int) -> tuple[int, int]:
    k, cur, total = _budget(op, n, p), n, 0
    r_max = getattr(op.config, "r", None)
    while cur > k:
        a, b = (cur + 1) // 2, cur // 2
        total += 2 * a * b * d + 2 * cur * d  # similarity of A to B + size-weighted merge
        r = min(cur // 2, cur - k, r_max or cur)
        if r <= 0:
            break
        cur -= r
    return total, cur


def _pooling(op: Any, n: int, d: int, p: int) -> tuple[int, int]:
    return n * d, _budget(op, n, p) if op.name != "m3" else min(n, int(op.config.keep) * p)


def _free(op: Any, n: int, d: int, p: int) -> tuple[int, int]:
    return 0, _budget(op, n, p)


def _score_sum(op: Any, n: int, d: int, p: int) -> tuple[int, int]:
    layers = sum(len(v) for v in op.requires.values()) or 1
    return n * layers, _budget(op, n, p)


for _name, _fn in {"pool": _pooling, "m3": _pooling, "random": _free, "uniform": _free, "vtc-cls": _score_sum,
                   "hired": _score_sum, "globalcom2": _score_sum, "fastervlm": _score_sum, "visionzip": _score_sum,
                   "prumerge": _score_sum}.items():
    register_op_flops(_name)(_fn)


def op_flops(op: Any, n_in: int, dim: int, partitions: int = 1) -> tuple[int, int, bool]:
    """``(flops, n_out, known)`` of one operator on one image of ``n_in`` tokens of width ``dim``.

    The operator's own ``flops(n_in, dim, partitions)`` wins when it defines one (returning the
    FLOPs, or ``(flops, n_out)``); else the estimate registered for its name; else 0 and
    ``known=False``.
    """
    own = getattr(op, "flops", None)
    if callable(own):
        out = own(n_in, dim, partitions)
        if isinstance(out, tuple):
            return int(out[0]), int(out[1]), True
        return int(out), _budget(op, n_in, partitions), True
    fn = OP_FLOPS.get(getattr(op, "name", ""))
    if fn is None:
        return 0, _budget(op, n_in, partitions), False
    f, n_out = fn(op, n_in, dim, partitions)
    return int(f), int(n_out), True



def tap_flops(v: VisionShape, requires: Mapping[str, Sequence[Any]], passes: int = 1,
              grids: list[tuple[int, int]] | None = None) -> int:
    """Matrix-multiply FLOPs of the ``vtc.taps`` hooks recording ``requires`` (``{signal: [layers]}``,
    any layer form, resolved against ``v``'s depth and ``feature_layer``) on ``passes`` tower forwards
    (or one per patch grid in ``grids``), as :mod:`vtc.taps` computes them. Per layer and pass of
    ``N`` tokens (prefix included) of width ``D = H*d``:

    - ``cls_attn`` / ``cls_logits``: the CLS row, computed as one product of the ``N`` keys with a
      block-diagonal ``[D, H]`` matrix of the heads' CLS queries (one kernel for all heads):
      ``2*N*D*H`` (:func:`vtc.attention.cls_attention`);
    - ``attn_received``: every query row against every key, ``2*H*N²*d = 2*N²*D`` (in chunks of
      rows; within each attention window in Qwen2.5-VL's window layers); its softmax and the column
      sums are not counted (the module's convention: matrix multiplies only);
    - ``keys``, ``key_norms``, ``hidden``: read from what the attention computes, no product;
    - ``fused_qkv`` towers (open_clip) re-project from the block input what the hook needs: the
      keys ``2*N*D²`` (``attn_received``, ``key_norms``), the queries ``2*N*D²`` (``attn_received``),
      head-mean keys of the patches ``2*(N - prefix)*D*d`` (``keys``), and the CLS row through the
      key projection instead of the keys (``2*D²`` for the CLS query, ``2*D²`` to pull it back
      through ``W_k``, ``2*D`` for the key bias, ``2*N*D*H`` against the tokens;
      :func:`vtc.attention.cls_attention_from_input`).

    Checked against ``FlopCounterMode`` on tiny towers with a tap attached (``tests/bench/test_tap_flops.py``).
    """
    if not requires:
        return 0
    from vtc.taps.layers import LayerSpace

    if (v.heads <= 0 or v.hidden % v.heads) and any(sig in requires for sig in (*CLS_SIGNALS, "keys")):
        raise ConfigError(f"the taps' FLOPs of {sorted(requires)} need the tower's attention heads: "
                          "give VisionShape(heads=...)")
    space = LayerSpace(v.layers, v.feature_layer)
    layers: dict[int, set[str]] = {}
    for sig, ls in requires.items():
        for l in space.resolve_all(ls, where=f"the taps' requires[{sig!r}]", error=ConfigError):
            layers.setdefault(l, set()).add(sig)
    D, H = v.hidden, max(v.heads, 1)
    prefix = int(v.cls_token)
    total = 0
    for h, w in ([v.grid()] * passes if grids is None else grids):
        n = h * w + prefix
        full, windows = _attention_blocks(v, h, w)
        for l, want in layers.items():
            if want & CLS_SIGNALS:
                total += 2 * n * D * H + (4 * D * D + 2 * D if v.fused_qkv else 0)
            if "attn_received" in want:
                total += 2 * D * (full if not v.window or l in v.full_attention_layers else windows)
            if v.fused_qkv:
                total += 2 * n * D * D * (("attn_received" in want) + bool(want & {"attn_received", "key_norms"}))
                total += 2 * (n - prefix) * D * (D // H) if "keys" in want else 0
    return total


def pipeline_flops(shape: ModelShape, pipeline: Any, visual_tokens: int, passes: int = 1,
                   grids: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Operator FLOPs per image and the token count each stage hands on.

    ``visual_tokens`` is what the vision stage sees (patch tokens of all partitions); ``grids``: the
    patch grid of each tower pass (dynamic-resolution towers), for the taps. Returns
    ``{"ops": flops, "after_vision": n, "after_llm": n, "unknown": [op names without an estimate]}``.
    """
    total, unknown, n = 0, [], visual_tokens
    after_vision = visual_tokens
    if pipeline is not None and len(pipeline):
        if shape.vision is not None:
            total += tap_flops(shape.vision, getattr(pipeline, "requires", {}) or {}, passes, grids)
        merged = shape.vision is not None and shape.vision.merge > 1  # operators see the merged LLM tokens
        for op in pipeline:
            if op.stage == "llm_layer":  # counted per decoder layer by estimate()
                continue
            vision_width = op.stage == "vision" and shape.vision and not merged
            dim = shape.vision.hidden if vision_width else (shape.lm.hidden if shape.lm else 0)
            f, n, known = op_flops(op, n, dim, passes)
            total += f
            if not known:
                unknown.append(op.name)
            if op.stage == "vision":
                after_vision = n
    return {"ops": total, "after_vision": after_vision, "after_llm": n, "unknown": unknown}


def _attention_rows(lm: LMShape, rows: int, n: int) -> int:
    """Recomputing ``rows`` query rows of one layer's attention logits against ``n`` keys."""
    return 2 * rows * n * lm.heads * lm.head_dim


def layer_op_flops(op: Any, lm: LMShape, text: int, visual: int) -> int:
    """One call of an in-LLM operator at a layer holding ``text`` + ``visual`` tokens.

    The operator's own ``layer_flops(lm, text, visual)`` wins; otherwise the rows it recomputes
    (FastV, PyramidDrop: the last prompt row; SparseVLM: at most every text row, plus its rater
    choice and clustering; AIM: the block from the first visual token on, plus the PageRank
    products) and a router's linear score.
    """
    own = getattr(op, "layer_flops", None)
    if callable(own):
        return int(own(lm, text, visual))
    n = text + visual
    name = getattr(op, "name", "")
    if name in ("fastv", "pdrop"):
        return _attention_rows(lm, 1, n)
    if name == "sparsevlm":
        return _attention_rows(lm, text, n) + 2 * visual * text * lm.hidden + 2 * visual * visual * lm.hidden
    if name == "aim":
        iters = getattr(op.config, "iterations", 5)
        return _attention_rows(lm, n, n) + iters * 2 * lm.heads * n * n
    if name == "router":
        return 2 * n * lm.hidden
    return 0


# ------------------------------------------------------------------------- one question
def estimate(
    shape: ModelShape,
    *,
    text_tokens: int,
    kept_tokens: int,
    new_tokens: int,
    passes: int = 1,
    projector_tokens: int | None = None,
    pipeline: Any = None,
    visual_tokens: int | None = None,
    dtype_bytes: int = 2,
    grids: list[tuple[int, int]] | None = None,
    layer_visual: Sequence[int] | None = None,
) -> dict[str, Any]:
    """FLOPs of answering one question, per stage (see the module docstring).

    ``kept_tokens``: visual tokens the LLM received; ``text_tokens``: the other prompt tokens;
    ``new_tokens``: tokens generated; ``passes``: tower forwards; ``grids``: the patch grid of each
    pass instead (dynamic-resolution towers; sets ``passes``); ``projector_tokens``: tokens the
    projector saw (default: every patch of every pass, or fewer after vision-stage operators; every
    merged token for a merging tower); ``visual_tokens``: the visual tokens before compression (for
    the operators' estimate; default: the patches, merged for a merging tower);
    ``layer_visual``: visual tokens each decoder layer processed, as measured by the integration
    (default: predicted by :func:`layer_visual_counts` from the pipeline's in-LLM operators).

    Besides the stages: ``equivalent_tokens`` (layer-average visual tokens, equal to
    ``kept_tokens`` without in-LLM operators), ``fastv_compat``, ``kv_cache_bytes`` and, with
    in-LLM operators, ``layer_visual``.
    """
    lm, v = shape.lm, shape.vision
    if lm is None:
        raise ConfigError("FLOPs estimates need a language model in the config (text_config)")
    if grids is not None:
        passes = len(grids)
    if v is None:
        patch_tokens = 0
    else:
        patch_tokens = sum(h * w for h, w in grids) if grids is not None else v.patches * passes
        patch_tokens //= v.merge**2  # what the projector and the operators see
    ops = pipeline_flops(shape, pipeline, patch_tokens if visual_tokens is None else visual_tokens, passes, grids) \
        if pipeline is not None else {"ops": 0, "after_vision": patch_tokens, "unknown": []}
    if projector_tokens is None:
        vision_ops = pipeline is not None and pipeline.has_stage("vision") and (v is None or v.merge == 1)
        projector_tokens = min(patch_tokens, ops["after_vision"]) if vision_ops else patch_tokens
    n = text_tokens + kept_tokens
    if layer_visual is None:
        layer_visual = layer_visual_counts(pipeline, kept_tokens, lm.layers)
    layer_tokens = None if layer_visual is None else [text_tokens + int(c) for c in _per_layer(lm, 0, layer_visual)]
    in_llm = 0
    if layer_visual is not None and pipeline is not None:
        for layer, layer_ops in pipeline.layer_schedule(lm.layers).items():
            in_llm += sum(layer_op_flops(op, lm, text_tokens, int(layer_visual[layer])) for op in layer_ops)
    out = {
        "vision": vision_flops(v, passes, grids) if v is not None else 0,
        "projector": projector_flops(shape, projector_tokens),
        "ops": ops["ops"] + in_llm,
        "prefill": prefill_flops(lm, n, logits=1, layer_tokens=layer_tokens),
        "decode": decode_flops(lm, n, new_tokens, layer_tokens=layer_tokens),
    }
    out["total"] = sum(out.values())
    out["fastv_compat"] = fastv_compat(lm, n, layer_tokens)
    extra = max(new_tokens - 1, 0)
    out["kv_cache_bytes"] = kv_cache_bytes(lm, n + extra, dtype_bytes,
                                           None if layer_tokens is None else [t + extra for t in layer_tokens])
    out["equivalent_tokens"] = float(kept_tokens) if layer_visual is None else equivalent_tokens(layer_visual)
    if layer_visual is not None:
        out["layer_visual"] = [int(c) for c in layer_visual]
    if ops["unknown"]:
        out["ops_unknown"] = ops["unknown"]
    return out


def tflops(x: float | int | None) -> float:
    """FLOPs to TFLOPs (NaN for None)."""
    return float("nan") if x is None else x / 1e12


def describe(flops: Mapping[str, Any]) -> str:
    """A one-line human summary of an :func:`estimate` result."""
    skip = ("kv_cache_bytes", "ops_unknown", "equivalent_tokens", "layer_visual")
    parts = [f"{k}={v / 1e9:.3g} GFLOPs" for k, v in flops.items() if k not in skip]
    return ", ".join(parts) + (f", kv={flops.get('kv_cache_bytes', 0) / 2**20:.3g} MiB" if "kv_cache_bytes" in flops else "")

