"""copy.deepcopy of a model while vtc.apply is active: the copy gets its own compression.

The copy is made of the model as it was before ``vtc.apply`` (no wrapped forward, none of the
tap's hooks) and gets its own handle with a copy of the pipeline: it computes with its own weights,
compresses on its own, and each handle's ``remove()`` restores only its own model.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vtc
from vtc.integrations import handle_of


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# a tap with hooks on the tower (CLS attention), and the in-LLM stage (decoder hooks, attention configs)
@pytest.mark.parametrize("spec", ["vtc-cls:keep=9,layers=[-2]", "fastv:K=1,R=0.5"])
@torch.no_grad()
def test_a_deep_copy_has_its_own_compression(small_models, photos, spec):
    model, proc = small_models["llava"]
    batch = proc(images=photos[:1], text=["user : <image> what is this ?"], return_tensors="pt")
    model(**batch)  # transformers installs its own output-recording hooks on a first forward
    stock_hooks = _hooks(model)
    with vtc.apply(model, spec) as h:
        ref = model(**batch).logits
        last = h.last
        clone = copy.deepcopy(model)
        ch = handle_of(clone)
        assert ch is not None and ch is not h and ch.active and handle_of(model) is h
        assert ch.pipeline is not h.pipeline and ch.pipeline == h.pipeline
        assert _hooks(clone) == _hooks(model)  # its own tap, not the original's hooks as well
        torch.testing.assert_close(clone(**batch).logits, ref)
        assert ch.last.counts == last.counts and ch.last.extra.keys() == last.extra.keys()
        for p in clone.lm_head.parameters():
            p.zero_()
        assert not torch.equal(clone(**batch).logits, ref)  # the copy runs its own weights
        torch.testing.assert_close(model(**batch).logits, ref)  # and leaves the original alone
    assert not h.active and ch.active  # leaving the block removed the original's handle only
    ch.last = None
    clone(**batch)
    assert ch.last is not None and ch.last.counts == last.counts  # still compressed
    ch.remove()
    assert "forward" not in clone.__dict__ and "__deepcopy__" not in clone.__dict__
    assert _hooks(clone) == _hooks(model) == stock_hooks
    ch.last = None
    assert clone(**batch).logits.shape[1] == batch["input_ids"].shape[1] and ch.last is None  # stock again


def test_a_copy_after_remove_is_a_plain_copy(small_models):
    model, _ = small_models["llava"]
    vtc.apply(model, "random:keep=4").remove()
    clone = copy.deepcopy(model)
    assert handle_of(clone) is None and "forward" not in clone.__dict__
