"""Operator base classes (vtc/ops/base.py): budgets from keep/ratio, per-image no-ops, configs."""

import dataclasses

import pytest
import torch

from vtc import VisualTokens
from vtc.errors import BudgetError, ConfigError
from vtc.ops.base import SelectConfig, Selector, config_dict


class _LastK(Selector):
    """Keeps the last k tokens in reverse order (so a row it touches visibly changes)."""

    name = "last-k"

    def select(self, tokens, k):
        n = tokens.counts
        K = int(k.max())
        j = torch.arange(K).unsqueeze(0)
        return tokens.gather((n.unsqueeze(1) - 1 - j).clamp_min(0), j < k.unsqueeze(1))


def test_resolve_keep_from_keep_and_ratio():
    counts = torch.tensor([10, 3, 576, 5, 1])
    assert _LastK(SelectConfig(keep=4)).resolve_keep(counts).tolist() == [4, 3, 4, 4, 1]
    # round half to even, like python's round(); at least one token
    assert _LastK(SelectConfig(ratio=0.5)).resolve_keep(counts).tolist() == [5, 2, 288, 2, 1]
    assert _LastK(SelectConfig(ratio=0.098)).resolve_keep(counts).tolist() == [1, 1, 56, 1, 1]
    with pytest.raises(BudgetError, match="no budget"):
        _LastK(SelectConfig()).resolve_keep(counts)


def test_an_image_that_fits_is_untouched_in_a_mixed_batch():
    t = VisualTokens.from_list([torch.randn(6, 2), torch.randn(3, 2)], size=[torch.ones(6) * 2, torch.ones(3)],
                               signals={"cls_attn": {22: [torch.rand(6), torch.rand(3)]}})
    out = _LastK(SelectConfig(keep=4))(t)
    assert out.counts.tolist() == [4, 3]
    assert out.index[0].tolist() == [5, 4, 3, 2] and out.index[1, :3].tolist() == [0, 1, 2]
    torch.testing.assert_close(out.x[1, :3], t.x[1, :3], rtol=0, atol=0)
    torch.testing.assert_close(out.signals["cls_attn"][22][1, :3], t.signals["cls_attn"][22][1, :3], rtol=0, atol=0)
    assert out.size[0].tolist() == [2.0] * 4 and out.size[1, :3].tolist() == [1.0] * 3
    assert _LastK(SelectConfig(keep=6))(t) is t


def test_budget_rows_fill_each_partition():
    t = VisualTokens(x=torch.randn(1, 6, 2), group=torch.tensor([[0, 0, 0, 1, 1, 1]]), budget=torch.tensor([[2, 5]]))
    out = _LastK(SelectConfig())(t)
    assert out.index.tolist() == [[2, 1, 3, 4, 5]] and out.budget is None


def test_select_config_checks():
    with pytest.raises(BudgetError):
        SelectConfig(keep=0)
    with pytest.raises(BudgetError):
        SelectConfig(ratio=1.01)
    with pytest.raises(BudgetError):
        SelectConfig(keep=1, ratio=0.5)
    with pytest.raises(ConfigError):
        SelectConfig(stage="projector")


def test_config_dict_full_and_non_default():
    @dataclasses.dataclass
    class C(SelectConfig):
        layers: tuple = (16, 17)

    assert config_dict(C(keep=3)) == {"stage": None, "keep": 3, "ratio": None, "layers": [16, 17]}
    assert config_dict(C(keep=3, layers=(16, 17)), full=False) == {"keep": 3}
