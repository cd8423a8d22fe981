"""Helpers shared by the tap tests: a snapshot of every hook and attribute of a tower, and a recorder of
the shape of every tensor aten ops return (to show that no N x N block is made)."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def hook_state(model: nn.Module) -> dict:
    """Per module: its attribute names and the keys of every hook dict."""
    out = {}
    for name, mod in model.named_modules():
        out[name] = (
            tuple(sorted(vars(mod))),
            tuple(tuple(getattr(mod, d, {}).keys()) for d in _HOOK_DICTS),
        )
    return out


@pytest.fixture
def snapshot():
    return hook_state


class ShapeRecorder(TorchDispatchMode):
    """``with ShapeRecorder() as rec: ...`` records in ``rec.shapes`` the shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.fixture
def shapes():
    """A factory of :class:`ShapeRecorder` s."""
    return ShapeRecorder
