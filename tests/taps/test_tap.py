"""vtc.taps.tap: what attach() accepts and refuses, and the Tap lifecycle (signals per forward, clear, remove)."""

import pytest
import torch

pytest.importorskip("transformers")
from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

import vtc  # noqa: E402
from vtc.errors import TapError, UnsupportedModelError  # noqa: E402
from vtc.taps import SIGNALS, Tap, attach  # noqa: E402


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                           image_size=32, patch_size=8)
    return CLIPVisionModel(cfg).eval()


def _pixels(seed):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("thing", [torch.nn.Sequential(torch.nn.Linear(4, 4)), "clip", None])
def test_unknown_towers_raise(thing):
    with pytest.raises(UnsupportedModelError):
        attach(thing, {"keys": [0]})


def test_unknown_signal_raises_listing_the_known_ones(tower):
    with pytest.raises(TapError, match="cls_attn, cls_logits, keys, hidden"):
        attach(tower, {"attention_map": [1]})
    assert SIGNALS == ("cls_attn", "cls_logits", "keys", "hidden", "attn_received", "key_norms")


@pytest.mark.parametrize("layers", [[1.0], ["2"], [True]])
def test_non_integer_layers_raise(tower, layers):
    with pytest.raises(TapError, match="integers"):
        attach(tower, {"keys": layers})


def test_requires_not_a_mapping_raises(tower):
    with pytest.raises(TapError, match="map a signal name"):
        attach(tower, ["cls_attn"])


def test_a_pipeline_is_accepted_as_requires(tower):
    pipe = vtc.build([{"op": "vtc-cls", "keep": 4, "layers": [1, 3]}])
    with attach(tower, pipe) as tap:
        assert isinstance(tap, Tap) and tap.requires == {"cls_attn": [1, 3]} == pipe.requires


def test_signals_come_from_the_most_recent_forward_in_a_new_dict(tower):
    with torch.no_grad(), attach(tower, {"cls_attn": [2], "keys": [1]}) as tap:
        tower(_pixels(1))
        first = tap.signals
        a1 = first["cls_attn"][2].clone()
        tower(_pixels(2))
        assert tap.signals is not first and torch.equal(first["cls_attn"][2], a1)  # old dict untouched
        a2 = tap.signals["cls_attn"][2]
        assert not torch.allclose(a1, a2)
    with torch.no_grad(), attach(tower, {"cls_attn": [2]}) as fresh:
        tower(_pixels(2))
    assert torch.equal(fresh.signals["cls_attn"][2], a2)


def test_only_requested_signals_and_layers_are_recorded(tower):
    with torch.no_grad(), attach(tower, {"cls_logits": [1], "hidden": [0, 3]}) as tap:
        tower(_pixels(0))
    assert {k: sorted(v) for k, v in tap.signals.items()} == {"cls_logits": [1], "hidden": [0, 3]}
    with torch.no_grad(), attach(tower, {}) as empty:
        tower(_pixels(0))
    assert empty.signals == {} and empty.num_patches == 16 and empty.num_tokens == 17


def test_clear_and_remove(tower):
    tap = attach(tower, {"keys": [0]})
    with torch.no_grad():
        tower(_pixels(0))
    assert tap.signals["keys"][0].shape == (2, 16, 8)
    tap.clear()
    assert tap.signals == {} and tap.num_patches is None and tap.attached
    tap.remove()
    assert not tap.attached
    with torch.no_grad():
        tower(_pixels(0))
    assert tap.signals == {}  # removed: nothing recorded any more
    assert "removed" in repr(tap) and "CLIP" in repr(tap)


def test_two_taps_record_independently(tower):
    a = attach(tower, {"cls_attn": [3]})
    b = attach(tower, {"cls_attn": [3], "keys": [3]})
    with torch.no_grad():
        tower(_pixels(0))
    assert torch.equal(a.signals["cls_attn"][3], b.signals["cls_attn"][3])
    a.remove()
    with torch.no_grad():
        tower(_pixels(1))
    assert sorted(b.signals) == ["cls_attn", "keys"]
    b.remove()


def test_signals_are_detached(tower):
    x = _pixels(0).requires_grad_(True)
    with attach(tower, {"cls_attn": [1], "keys": [1], "hidden": [1]}) as tap:
        out = tower(x)
    assert out.last_hidden_state.requires_grad
    assert not any(t.requires_grad for per_layer in tap.signals.values() for t in per_layer.values())
