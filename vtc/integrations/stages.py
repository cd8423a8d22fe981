"""Run a pipeline around a projector: vision-stage operators, projector, llm-stage operators.

Vision-stage operators see the tower's feature-layer patch tokens (with the tap's signals); the
projector maps what they keep to the language model's width, carrying ``index``, ``size``,
``group``, ``layout``, ``budget`` and signals along (so an allocator at the vision stage can hand
its per-partition budget to a selector at the llm stage); llm-stage operators see the projected
tokens. An operator with ``replaces_projector`` (MQT) is the projector: when one runs at the
vision stage the model's projector is skipped. A tower that already projects (Qwen VL's patch
merger) passes no projector: every operator then runs, in pipeline order, on its LLM-width tokens.
An optional ``assemble`` step (LLaVA-NeXT's AnyRes assembly) runs before operator ``assemble_at``
or at the end. ``llm_layer`` operators (always last) are not run here: they run inside the decoder.

Validation happens once: each stage's input is checked where it enters (``Pipeline.check_input``:
features, the signals that stage's operators read, sizes; one host sync) and the operators run
without re-checking (``Pipeline.run_op``). ``fast=True`` skips even that, and every structural
check of the operators and of the integration's own steps: ``vtc.apply`` passes it after its first
call with the same pipeline on the same model, which already validated the kind of input it builds.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from vtc.errors import ConfigError
from vtc.pipeline import Pipeline
from vtc.tokens import VisualTokens, inputs_checked

__all__ = ["replaces_projector", "run_stages"]


def replaces_projector(pipeline: Pipeline) -> bool:
    """Whether a vision-stage operator of ``pipeline`` maps features to LLM embeddings itself."""
    bad = [op.name for op in pipeline if op.replaces_projector and op.stage != "vision"]
    if bad:
        raise ConfigError(f"{bad[0]!r} replaces the projector, so it must run at stage 'vision' (got 'llm')")
    n = sum(1 for op in pipeline if op.replaces_projector)
    if n > 1:
        raise ConfigError("a pipeline can hold only one operator that replaces the projector")
    return n == 1


def run_stages(
    pipeline: Pipeline,
    tokens: VisualTokens,
    projector: Callable[[Tensor], Tensor] | None,
    *,
    projected: bool = False,
    out_dim: int | None = None,
    assemble: Callable[[VisualTokens], VisualTokens] | None = None,
    assemble_at: int | None = None,
    fast: bool = False,
) -> VisualTokens:
    """Compress ``tokens`` through every stage and return LLM-width tokens.

    ``projected=True`` means ``tokens`` are already projector outputs (valid only when the
    pipeline has no vision-stage operator). ``projector=None``: the tokens are LLM-width already and
    no projection runs between the stages. ``out_dim`` checks the width a projector-replacing
    operator returns. ``assemble`` runs once, before ``pipeline.ops[assemble_at]`` (default: at the
    end). ``fast``: no validation at all (see the module docstring).
    """
    with inputs_checked(fast=fast):  # the integration's own steps skip their checks alike
        return _stages(pipeline, tokens, projector, projected, out_dim, assemble, assemble_at, fast)


def _stages(pipeline: Pipeline, tokens: VisualTokens, projector: Callable[[Tensor], Tensor] | None,
            projected: bool, out_dim: int | None, assemble: Callable[[VisualTokens], VisualTokens] | None,
            assemble_at: int | None, fast: bool) -> VisualTokens:
    ops = list(pipeline)
    n = len(ops)
    at = n if assemble_at is None else assemble_at
    i = 0
    if not projected:
        if i < n and ops[i].stage == "vision" and not fast:
            pipeline.check_input(tokens, "vision")
        while i < n and ops[i].stage == "vision":
            tokens = pipeline.run_op(i, tokens, fast=fast)
            i += 1
        if replaces_projector(pipeline):
            if out_dim is not None and tokens.dim != out_dim:
                raise ConfigError(
                    f"the projector-replacing operator returned {tokens.dim}-wide tokens but the language model "
                    f"takes {out_dim}; configure it for this model"
                )
        elif projector is not None:
            tokens = tokens.replace(x=projector(tokens.x))
            if tokens.mask is not None:
                tokens = tokens.replace(x=tokens.x.masked_fill(~tokens.mask.unsqueeze(-1), 0))
    elif any(op.stage == "vision" for op in ops):
        raise ConfigError("projected tokens cannot go through vision-stage operators")
    assembled = False
    for j in range(i, n):
        if ops[j].stage == "llm_layer":  # runs inside the decoder (vtc.integrations.llm_layer)
            break
        if j == at and assemble is not None:
            tokens = assemble(tokens)
            assembled = True
        if j == i and ops[j].stage == "llm" and not fast:
            pipeline.check_input(tokens, "llm")
        tokens = pipeline.run_op(j, tokens, fast=fast)
    if assemble is not None and not assembled:
        tokens = assemble(tokens)
    return tokens
