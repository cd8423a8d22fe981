"""Helpers shared by the tap tests: a snapshot of every hook and attribute of a tower."""

import pytest
from torch import nn

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
