"""Greedy answer accuracy of an embedded model on a test split, per question type, at any token budget.

The answer is the model's argmax word right after the prompt (answers are single words, so this
is greedy decoding's first token). Token budgets:

- all visual tokens (default);
- ``pipeline=``: any vtc pipeline whose operators need no tower signals (``"uniform:keep=64"``,
  ``"random:keep=64"``, ``"pool:keep=64"``, ``"divprune:keep=64"``, ``"mqt:keep=64"``), run on the
  tower's patch features (stage ``vision``, before the projector; an operator with
  ``replaces_projector`` is used instead of it) and on the projector's outputs (stage ``llm``);
  LLaVA (one partition) only. This is a stand-in for ``vtc.apply`` / ``vtc bench`` until those land;
- ``subset=k``: a random ``k``-token subset of every image's visual sequence, as in training
  (LLaVA-NeXT included: newline tokens are part of the sequence);
- ``mqt=`` an MQT projector (``tiny-mqt``) with ``m`` queries.

Position ids are contiguous (``positions="original"`` keeps the kept tokens' original ids).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from vtc.models.tiny.batch import eval_batch
from vtc.models.tiny.datasets import Item
from vtc.models.tiny.forward import assemble, encode_images, lm_hidden, random_subset, tower

__all__ = ["Accuracy", "evaluate", "answer_logits"]


@dataclass
class Accuracy:
    """Correct / total overall, per question type, per ``type/detail`` and per data set."""

    correct: int = 0
    total: int = 0
    by_type: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    by_detail: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    tokens: float = 0.0  # mean visual tokens fed to the LLM

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.total)

    def add(self, ok: bool, meta: dict) -> None:
        self.correct += int(ok)
        self.total += 1
        for d, key in ((self.by_type, meta["qtype"]), (self.by_detail, f"{meta['qtype']}/{meta['detail']}")):
            d[key][0] += int(ok)
            d[key][1] += 1

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "n": self.total, "tokens": self.tokens,
                "by_type": {k: v[0] / v[1] for k, v in sorted(self.by_type.items())},
                "n_by_type": {k: v[1] for k, v in sorted(self.by_type.items())},
                "by_detail": {k: v[0] / v[1] for k, v in sorted(self.by_detail.items())}}

    def table(self) -> str:
        rows = [f"{'all':24s} {self.accuracy * 100:6.2f}%  n={self.total}  tokens={self.tokens:.1f}"]
        rows += [f"{k:24s} {v[0] / v[1] * 100:6.2f}%  n={v[1]}" for k, v in sorted(self.by_type.items())]
        return "\n".join(rows)


def _pipeline_tokens(model, pipeline, pixel_values):
    """Tower -> vision-stage ops -> projector (or a projector-replacing op) -> llm-stage ops."""
    from vtc.tokens import Layout, VisualTokens

    feats, _ = tower(model, pixel_values)
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    tokens = VisualTokens(x=feats, layout=Layout.grid(g))
    replaced = False
    for op in pipeline.stage_ops("vision"):
        tokens = op(tokens)
        replaced = replaced or op.replaces_projector
    if not replaced:
        tokens = tokens.replace(x=model.model.multi_modal_projector(tokens.x))
    tokens = pipeline(tokens, stage="llm")
    return tokens.x, tokens.valid


@torch.no_grad()
def answer_logits(model, batch, *, pipeline=None, subset: int | None = None, mqt=None, m: int | None = None,
                  positions: str = "contiguous", generator: torch.Generator | None = None):
    """``(logits [B, V] of the word after each prompt, visual tokens per image [B])``."""
    if pipeline is not None:
        if batch.image_sizes is not None:
            from vtc.errors import UnsupportedModelError

            raise UnsupportedModelError("evaluate(pipeline=...) handles LLaVA (one partition); for LLaVA-NeXT "
                                        "use subset= or vtc.apply")
        vis, valid = _pipeline_tokens(model, pipeline, batch.pixel_values)
    else:
        vo = encode_images(model, batch.pixel_values, batch.image_sizes, mqt=mqt, m=m)
        vis, valid = vo.tokens, vo.valid
    n_full = valid.sum(1)
    vis_pos = None
    if subset is not None:
        idx, ok = random_subset(valid, subset, generator)
        vis, valid = vis.gather(1, idx.unsqueeze(-1).expand(-1, -1, vis.shape[-1])), ok
        vis_pos = idx if positions == "original" else None
    inputs, pos, start = assemble(model, batch.prefix, vis, valid, batch.suffix, batch.lengths,
                                  vis_pos=vis_pos, n_full=n_full)
    hidden = lm_hidden(model, inputs, pos)
    last = hidden[torch.arange(batch.size), start + batch.lengths - 1]
    return model.lm_head(last).float(), valid.sum(1)


def evaluate(model, processor, items: list[Item], *, pipeline=None, subset: int | None = None, mqt=None,
             m: int | None = None, positions: str = "contiguous", batch_size: int = 32, seed: int = 0) -> Accuracy:
    """Greedy accuracy of ``model`` on ``items`` (see the module docstring for the budget options)."""
    if isinstance(pipeline, str):
        import vtc

        pipeline = vtc.build(pipeline)
    model.eval()
    tok = processor.tokenizer
    acc = Accuracy()
    g = torch.Generator().manual_seed(seed)
    ntok = 0.0
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        b = eval_batch(processor, chunk)
        logits, n = answer_logits(model, b, pipeline=pipeline, subset=subset, mqt=mqt, m=m, positions=positions,
                                  generator=g)
        pred = logits.argmax(-1).tolist()
        ntok += float(n.sum())
        for p, ans, meta in zip(pred, b.answers, b.meta):
            acc.add(p == tok.convert_tokens_to_ids(ans), meta)
    acc.tokens = ntok / max(1, acc.total)
    return acc
