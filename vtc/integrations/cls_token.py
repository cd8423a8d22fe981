"""The tower's CLS token, handed to the operators that include it in their output (VisionZip official).

Most operators see only a tower's patch tokens. VisionZip's official code keeps the CLS token of
each image (each LLaVA-NeXT partition) as one of its dominant tokens ("VisionZip: Longer is Better
but Not Necessary in Vision Language Models", Yang et al., CVPR 2025); such an operator says so
with ``wants_cls_token``. :func:`wanted` checks a pipeline once (the operator must come first, so
no earlier operator treats the CLS token as a patch) and :func:`insert` puts the CLS token, the
feature-layer hidden state of the tower's first token (projected like the patches when the tokens
are already projected), as the first token of each partition with ``index == CLS_INDEX`` (-1),
size 1 and zero signals; the operator reads neither its signals nor its grid position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vtc.errors import ConfigError
from vtc.ops.visionzip import CLS_INDEX
from vtc.pipeline import Pipeline
from vtc.tokens import VisualTokens

__all__ = ["CLS_INDEX", "wanted", "insert"]


def wanted(pipeline: Pipeline, family: str, has_cls: bool) -> bool:
    """Whether ``pipeline``'s first operator takes the CLS token; raise :class:`ConfigError` when a
    later operator wants it or the tower has none to give (``has_cls``)."""
    ops = list(pipeline)
    wants = [i for i, op in enumerate(ops) if getattr(op, "wants_cls_token", False)]
    if not wants:
        return False
    name = ops[wants[0]].name
    if wants != [0]:
        raise ConfigError(
            f"{name!r} takes the tower's CLS token (compat='official'), so it must be the first operator of the "
            f"pipeline: an operator before it would treat the CLS token as a patch. Put it first, or use "
            f"{name}:compat=clean")
    if not has_cls:
        raise ConfigError(f"{name!r} with compat='official' keeps the tower's CLS token, which this {family} model "
                          "does not hand to its projector (a tower without CLS, or vision_feature_select_strategy "
                          f"'full'); on a tower without CLS use {name}:signal=attn_received (it keeps no CLS token), "
                          f"else {name}:compat=clean")
    return True


def insert(tokens: VisualTokens, cls: Tensor, parts: Sequence[int] | None = None) -> VisualTokens:
    """``tokens`` with ``cls[b, p]`` (``[B, P, D]``) first in partition ``p`` of image ``b``.

    ``parts``: partitions per image (default: every image has ``P``). Tokens of a partition keep
    their order; images stay left-packed; signals get zeros at the CLS tokens.
    """
    B, N = tokens.x.shape[:2]
    P = cls.shape[1]
    dev = tokens.device
    counts = torch.tensor(list(parts) if parts is not None else [P] * B, device=dev)
    p = torch.arange(P, device=dev)
    cls_valid = p.unsqueeze(0) < counts.unsqueeze(1)  # [B, P]
    group = tokens.group if tokens.group is not None else torch.zeros(B, N, dtype=torch.long, device=dev)
    valid = torch.cat([cls_valid, tokens.valid], 1)
    # each partition's CLS token first, then its tokens in their order; padding last
    key = torch.cat([p.expand(B, P) * (N + 1), group * (N + 1) + 1 + torch.arange(N, device=dev)], 1)
    key = torch.where(valid, key, torch.full_like(key, torch.iinfo(torch.long).max))
    order = torch.sort(key, dim=1, stable=True).indices
    M = int(valid.sum(1).max().item()) if B else 0
    order = order[:, :M]
    rows = torch.arange(B, device=dev).unsqueeze(1)

    def take(head: Tensor, body: Tensor) -> Tensor:
        return torch.cat([head.to(body.dtype), body], 1)[rows, order]

    def zeros_like_rows(t: Tensor) -> Tensor:
        return torch.zeros(B, P, *t.shape[2:], dtype=t.dtype, device=t.device)

    out_valid = valid[rows, order]
    index = take(torch.full((B, P), CLS_INDEX, dtype=torch.long, device=dev), tokens.index)
    return VisualTokens(
        x=take(cls.to(tokens.x.device), tokens.x).masked_fill(~out_valid.unsqueeze(-1), 0),
        mask=None if bool(out_valid.all()) else out_valid,
        index=index.masked_fill(~out_valid, 0),
        size=None if tokens.size is None else take(torch.ones(B, P, device=dev), tokens.size),
        group=None if tokens.group is None else take(p.expand(B, P), tokens.group),
        layout=tokens.layout,
        signals={k: {l: take(zeros_like_rows(t), t) for l, t in v.items()} for k, v in tokens.signals.items()},
        budget=tokens.budget,
        layer_space=tokens.layer_space,
    )
