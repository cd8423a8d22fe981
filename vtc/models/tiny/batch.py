"""Batches for training and evaluation: pixels from the model's own image processor, text as token ids.

A sample is an image and a conversation. Its sequence is ``prefix`` (``<s> user :``), the visual
tokens, then ``suffix``: ``"{q1} assistant : {a1} </s>"`` and, in training, further turns
``"user : {q} assistant : {a} </s>"``. Exactly the tokens the HF processor produces for
``vocab.prompt(q1) + " " + a1 + "</s>"``, with the ``<image>`` run cut out (the tests check it), so
the same model sees the same inputs whether driven by the processor or by this training code.
Training batches are a pure function of ``(variant, step)``: sample ``i`` of data set ``d`` at step
``s`` is that data set's training sample ``s * n_d + i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from vtc.models.tiny import vocab
from vtc.models.tiny.aux import canvas_views, view_targets
from vtc.models.tiny.datasets import EasyVQA, Item, dataset
from vtc.models.tiny.render import render, render_labels

__all__ = ["Batch", "train_batch", "eval_batch", "split_counts"]


@dataclass
class Batch:
    """Model inputs of one batch (see the module docstring)."""

    pixel_values: Tensor
    image_sizes: Tensor | None
    prefix: Tensor  # [P0] token ids before the image, shared by every sample
    suffix: Tensor  # [B, L] token ids after the image, right-padded
    lengths: Tensor  # [B] real suffix lengths
    target: Tensor  # [B, L] bool: suffix tokens the loss predicts (answers and </s>)
    aux: dict[str, Tensor] | None = None  # per tower pass, for the views that have a scene
    aux_views: Tensor | None = None  # [X] bool: tower passes (images, or NeXT partitions) with targets
    answers: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.suffix.shape[0])


def split_counts(batch: int, mix: tuple[tuple[str, float], ...]) -> list[tuple[str, int]]:
    """Images per data set in a batch of ``batch`` (largest remainder; every share > 0 gets >= 1)."""
    total = sum(w for _, w in mix)
    raw = [batch * w / total for _, w in mix]
    n = [max(1, int(r)) if w > 0 else 0 for r, (_, w) in zip(raw, mix)]
    order = sorted(range(len(mix)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    i = 0
    while sum(n) < batch:
        n[order[i % len(order)]] += 1
        i += 1
    while sum(n) > batch:
        j = max(range(len(n)), key=lambda j: n[j])
        n[j] -= 1
    return [(name, k) for (name, _), k in zip(mix, n)]


def _encode_text(tok, suffixes: list[str], train: bool) -> tuple[Tensor, Tensor, Tensor]:
    ids = tok(suffixes, add_special_tokens=False)["input_ids"]
    L = max(len(x) for x in ids)
    pad = tok.pad_token_id
    suffix = torch.full((len(ids), L), pad, dtype=torch.long)
    for b, x in enumerate(ids):
        suffix[b, :len(x)] = torch.tensor(x, dtype=torch.long)
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    target = torch.zeros_like(suffix, dtype=torch.bool)
    if train:
        asst, colon, eos = (tok.convert_tokens_to_ids(t) for t in ("assistant", ":", vocab.EOS))
        after = torch.zeros_like(target)
        after[:, 2:] = (suffix[:, :-2] == asst) & (suffix[:, 1:-1] == colon)
        target = (after | (suffix == eos)) & (torch.arange(L) < lengths[:, None])
    return suffix, lengths, target


def _prefix(tok) -> Tensor:
    ids = tok(vocab.prompt("x"))["input_ids"]
    img = tok.convert_tokens_to_ids("<image>")
    return torch.tensor(ids[:ids.index(img)], dtype=torch.long)


def _pixels(processor, images) -> tuple[Tensor, Tensor | None]:
    out = processor.image_processor(images, return_tensors="pt")
    return out["pixel_values"], out.get("image_sizes")


def _aux_for(processor, scenes: list, is_next: bool) -> tuple[dict[str, Tensor] | None, list[int]]:
    """Aux targets for the tower passes of the images that have a scene, and each image's view count
    (0 for images without a scene)."""
    patch = processor.patch_size
    size = processor.image_processor.crop_size["height"]  # the tower's input size
    view = size if is_next else None
    targets, n_views = [], []
    for scene in scenes:
        if scene is None:
            n_views.append(0)
            continue
        views = canvas_views(scene.height, scene.width, view)
        targets.append(view_targets(scene, render_labels(scene), views, size // patch))
        n_views.append(len(views))
    if not targets:
        return None, n_views
    return {k: torch.from_numpy(np.concatenate([t[k] for t in targets])) for k in targets[0]}, n_views


def train_batch(v, processor, step: int, recipe=None) -> Batch:
    """The training batch of ``step`` for variant ``v`` (its recipe unless ``recipe`` is given)."""
    recipe = recipe or v.recipe
    images, scenes, suffixes, answers = [], [], [], []
    for name, n in split_counts(recipe.batch, recipe.mix):
        ds = dataset(name)
        for i in range(n):
            idx = step * n + i
            if isinstance(ds, EasyVQA):
                img, qas = ds.train_sample(idx, recipe.turns)
                scene = None
            else:
                scene, qas = ds.train_sample(idx, recipe.turns)
                img = render(scene)
            q0 = qas[0]
            text = f"\n{q0.question} ASSISTANT: {q0.answer}{vocab.EOS}" + "".join(vocab.turn(q.question, q.answer)
                                                                                 for q in qas[1:])
            images.append(img)
            scenes.append(scene)
            suffixes.append(text)
            answers.append(q0.answer)
    tok = processor.tokenizer
    pixel_values, image_sizes = _pixels(processor, images)
    suffix, lengths, target = _encode_text(tok, suffixes, train=True)
    is_next = image_sizes is not None
    aux, aux_views = None, None
    if recipe.aux_weight > 0:
        aux, n_views = _aux_for(processor, scenes, is_next)
        if aux is not None:
            if is_next:
                from vtc.models.tiny.forward import partitions_per_image

                parts = partitions_per_image(processor.image_processor.image_grid_pinpoints,
                                             processor.image_processor.crop_size["height"], image_sizes)
            else:
                parts = [1] * len(scenes)
            if any(nv and nv != p for nv, p in zip(n_views, parts)):
                raise RuntimeError(f"aux views {n_views} do not match the processor's partitions {parts}")
            aux_views = torch.cat([torch.full((p,), nv > 0) for p, nv in zip(parts, n_views)])
    return Batch(pixel_values, image_sizes, _prefix(tok), suffix, lengths, target, aux, aux_views, answers)


def eval_batch(processor, items: list[Item]) -> Batch:
    """Single-turn inputs for ``items``: the model's next word after the prompt is its answer."""
    tok = processor.tokenizer
    pixel_values, image_sizes = _pixels(processor, [it.image for it in items])
    suffix, lengths, target = _encode_text(tok, [f"\n{it.question} ASSISTANT:" for it in items], train=False)
    meta = [{"qtype": it.qtype, "detail": it.detail, "dataset": it.dataset, "key": it.key} for it in items]
    return Batch(pixel_values, image_sizes, _prefix(tok), suffix, lengths, target,
                 answers=[it.answer for it in items], meta=meta)
