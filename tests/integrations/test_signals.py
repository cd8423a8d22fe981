"""Signals reach vision-stage operators aligned with their tokens (LLaVA and every LLaVA-NeXT partition).

A stand-in ``vtc.taps`` module (same interface: ``attach(tower, requires)``, ``with tap:``,
``tap.signals``, ``tap.remove()``) records, as ``cls_attn[l]``, channel 0 of encoder layer ``l``'s
output for every patch token. The selection vtc-cls makes through ``vtc.apply`` must then be
exactly the top-k of that channel computed from the stock tower's ``hidden_states``. The last test
uses the real ``vtc.taps`` against a CLS-attention reference computed from the tower's q/k.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

import vtc


class _Tap:
    """Like vtc.taps.Tap: hooks record every forward until remove() (leaving ``with tap:`` removes too)."""

    def __init__(self, tower, requires, feature_layer=None):
        self.signals, self._hooks = {}, []
        layers = getattr(tower, "vision_model", tower).encoder.layers
        for name, ls in requires.items():
            for l in ls:
                l = l % len(layers)
                self._hooks.append(layers[l].register_forward_hook(
                    lambda _m, _a, out, name=name, l=l: self._record(name, l, out)))

    def _record(self, name, l, out):
        h = out[0] if isinstance(out, tuple) else out
        self.signals.setdefault(name, {})[l] = h[:, 1:, 0].detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def remove(self):
        for h in self._hooks:
            h.remove()


@pytest.fixture
def fake_taps(monkeypatch):
    mod = types.ModuleType("vtc.taps")
    mod.attach = _Tap
    mod.to_tokens = None
    monkeypatch.setitem(sys.modules, "vtc.taps", mod)
    return mod


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
def test_vision_stage_operator_gets_the_taps_signals(setup, fake_taps):
    kind, model, _, batch, _ = setup
    tower = model.model.vision_tower
    pv = batch["pixel_values"]
    if kind == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = model.config
        parts = [image_size_to_num_patches(s.tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                 for s in batch["image_sizes"]]
        pv = torch.cat([pv[i, :p] for i, p in enumerate(parts)])
    else:
        parts = [1] * pv.shape[0]
    score = tower(pv, output_hidden_states=True).hidden_states[2][:, 1:, 0]  # output of layer 1, patch tokens
    scores = list(torch.split(score, parts))
    hooks = _hooks(model)
    k = 10
    with vtc.apply(model, f"vtc-cls:keep={k},layers=[1]", newline="none", unpad=False) as h:
        assert _hooks(model) == hooks + 1  # the tap's hook on layer 1
        model(**batch)
        model(**batch)  # the tap keeps recording on every forward
        assert _hooks(model) == hooks + 1
    assert _hooks(model) == hooks  # remove() removed the tap
    for b, s in enumerate(scores):
        want = set(torch.topk(s.reshape(-1), k).indices.tolist())  # over all of the image's partitions
        assert set(h.last.index[b].tolist()) == want
    assert h.last.counts == [k] * len(scores)


def test_a_tap_error_leaves_the_model_untouched(llava, monkeypatch):
    model, _ = llava
    mod = types.ModuleType("vtc.taps")

    def attach(tower, requires, feature_layer=None):
        raise vtc.errors.TapError("layer 99 is out of range")

    mod.attach = attach
    monkeypatch.setitem(sys.modules, "vtc.taps", mod)
    with pytest.raises(vtc.errors.TapError, match="out of range"):
        vtc.apply(model, "vtc-cls:keep=8,layers=[99]")
    assert "forward" not in model.__dict__


@torch.no_grad()
def test_real_taps_feed_vtc_cls_on_every_partition(small_models, photos):
    """The real vtc.taps: vtc-cls through vtc.apply keeps the top-k of an independent CLS-attention reference."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model, proc = small_models["llava_next"]
    batch = proc(images=photos[:2], text=["<image> describe", "what is the <image> ?"], return_tensors="pt",
                 padding=True)
    cfg = model.config
    parts = [image_size_to_num_patches(s.tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
             for s in batch["image_sizes"]]
    pv = torch.cat([batch["pixel_values"][i, :p] for i, p in enumerate(parts)])
    attn = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower).encoder.layers[2].self_attn
    got = {}
    hooks = [attn.q_proj.register_forward_hook(lambda _m, _a, o: got.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda _m, _a, o: got.__setitem__("k", o))]
    try:
        model.model.vision_tower(pv)
    finally:
        for hk in hooks:
            hk.remove()
    T, N, D = got["k"].shape
    H = attn.num_heads
    q = got["q"][:, :1].view(T, 1, H, -1).transpose(1, 2)
    k = got["k"].view(T, N, H, -1).transpose(1, 2)
    ref = ((q @ k.transpose(-1, -2)) * (D // H) ** -0.5).softmax(-1)[:, :, 0, 1:].mean(1)  # [T, patches]
    with vtc.apply(model, "vtc-cls:keep=12,layers=[2]", newline="none", unpad=False) as h:
        model(**batch)
    for b, s in enumerate(torch.split(ref, parts)):
        assert set(h.last.index[b].tolist()) == set(torch.topk(s.reshape(-1), 12).indices.tolist())
