"""vtc.integrations.stages: vision ops, projector (or an op replacing it), llm ops; budgets cross the projector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import vtc
from vtc.errors import ConfigError
from vtc.integrations.stages import run_stages
from vtc.ops.base import Allocator, OpConfig, Operator
from vtc.tokens import VisualTokens


@dataclass
class _PerPartition(OpConfig):
    keep: int = 3


class FixedBudget(Allocator):
    """Scratch allocator: ``keep`` tokens for every partition of every image."""

    name = "test-fixed-budget"
    Config = _PerPartition
    default_stage = "vision"

    def allocate(self, tokens: VisualTokens) -> VisualTokens:
        G = tokens.num_groups
        return tokens.replace(budget=torch.full((tokens.batch_size, G), self.config.keep, dtype=torch.long))


@dataclass
class _Width(OpConfig):
    dim: int = 64
    keep: int = 5


class Resampler(Operator):
    """Scratch projector-replacing operator (like MQT): the first ``keep`` tokens through its own linear map."""

    name = "test-resampler"
    Config = _Width
    default_stage = "vision"
    replaces_projector: ClassVar[bool] = True

    def __init__(self, *a, in_dim: int = 32, **kw):
        super().__init__(*a, **kw)
        torch.manual_seed(3)
        self.proj = nn.Linear(in_dim, self.config.dim)

    def forward(self, tokens: VisualTokens) -> VisualTokens:
        first = tokens.gather(torch.arange(self.config.keep).expand(tokens.batch_size, -1))
        return first.replace(x=self.proj(first.x))


def test_the_projector_maps_what_vision_ops_keep_and_fields_survive():
    x = torch.randn(2, 16, 4)
    proj = nn.Linear(4, 6)
    out = run_stages(vtc.build("random:keep=5 | divprune:keep=3"), VisualTokens(x=x), proj)
    assert out.x.shape == (2, 3, 6)
    torch.testing.assert_close(out.x, proj(x.gather(1, out.index.unsqueeze(-1).expand(-1, -1, 4))))


@torch.no_grad()
def test_an_allocators_budget_reaches_an_llm_stage_selector(setup):
    kind, model, _, batch, _ = setup
    pipe = vtc.build([FixedBudget(keep=3), vtc.create("random", stage="llm")])
    with vtc.apply(model, pipe, newline="none", unpad=False) as h:
        model(**batch)
    t = h.last.tokens
    group = t.group if t.group is not None else torch.zeros_like(t.index)  # LLaVA: one partition
    for b, n in enumerate(h.last.counts):
        groups = group[b, :n]
        assert torch.bincount(groups).tolist() == [3] * (int(groups.max()) + 1)
    if kind == "llava":
        assert h.last.counts == [3, 3, 3]
    else:  # base + crops: 3 per partition
        assert h.last.counts == [3 * lay.num_partitions for lay in t.layouts()]


@torch.no_grad()
def test_a_projector_replacing_operator_runs_instead_of_the_projector(llava, photos, lm_inputs):
    model, proc = llava
    batch = proc(images=photos[:2], text=["<image> describe", "what is the <image> ?"], return_tensors="pt", padding=True)
    op = Resampler(dim=model.config.text_config.hidden_size, keep=5)
    calls = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda *a: calls.append(1))
    try:
        with vtc.apply(model, vtc.build(op)) as h, lm_inputs(model) as rec:
            model(**batch)
    finally:
        hook.remove()
    assert calls == []
    feats = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:6]
    embeds = rec.calls[0]["inputs_embeds"]
    slots = batch["input_ids"].gather(1, h.last.positions.clamp_min(0)) == model.config.image_token_id
    torch.testing.assert_close(embeds[slots].view(2, 5, -1), op.proj(feats))


def test_a_projector_replacing_operator_must_be_at_the_vision_stage_and_fit_the_llm():
    with pytest.raises(ConfigError, match="stage 'vision'"):
        run_stages(vtc.build(Resampler(stage="llm")), VisualTokens(x=torch.randn(1, 8, 32)), nn.Identity())
    with pytest.raises(ConfigError, match="takes 48"):
        run_stages(vtc.build(Resampler(dim=64)), VisualTokens(x=torch.randn(1, 8, 32)), nn.Identity(), out_dim=48)
