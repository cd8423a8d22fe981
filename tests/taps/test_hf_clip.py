"""vtc.taps.hf_clip: taps on tiny random Hugging Face CLIP / SigLIP towers (SDPA) match eager attention."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel  # noqa: E402

from vtc.errors import TapError, UnsupportedModelError  # noqa: E402
from vtc.taps import attach  # noqa: E402

L, H, D, d = 4, 4, 32, 8
LAYERS = [0, 2, 3]  # first, middle, last
ALL = {"cls_attn": LAYERS, "cls_logits": LAYERS, "keys": LAYERS, "hidden": LAYERS}


def _config(cls):
    return cls(hidden_size=D, intermediate_size=64, num_hidden_layers=L, num_attention_heads=H, image_size=32,
               patch_size=8, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return CLIPVisionModel(_config(CLIPVisionConfig)).eval()


@pytest.fixture(scope="module")
def siglip():
    torch.manual_seed(1)
    return SiglipVisionModel(_config(SiglipVisionConfig)).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def eager_reference(model, x):
    """Eager attention maps, plus full q·kᵀ logits and keys from the eager run's own projections."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    qs, ks = {}, {}
    hooks = []
    for l, layer in enumerate(ref.encoder.layers):
        hooks.append(layer.self_attn.q_proj.register_forward_hook(lambda m, i, o, l=l: qs.__setitem__(l, o)))
        hooks.append(layer.self_attn.k_proj.register_forward_hook(lambda m, i, o, l=l: ks.__setitem__(l, o)))
    with torch.no_grad():
        out = ref(x, output_attentions=True, output_hidden_states=True)
    for h in hooks:
        h.remove()
    B, N = x.shape[0], qs[0].shape[1]
    logits, keys = {}, {}
    for l in range(L):
        q = qs[l].view(B, N, H, d).transpose(1, 2)
        k = ks[l].view(B, N, H, d).transpose(1, 2)
        logits[l] = q @ k.transpose(-1, -2) * d**-0.5  # the full N x N map, as a reference only
        keys[l] = k.mean(1)
        torch.testing.assert_close(logits[l].softmax(-1), out.attentions[l], atol=1e-6, rtol=0)
    return out.attentions, logits, keys, out.hidden_states


def test_clip_signals_equal_eager_attention(clip, pixels):
    attn, logits, keys, hidden = eager_reference(clip, pixels)
    with attach(clip, ALL) as tap, torch.no_grad():
        clip(pixels)
    assert clip.config._attn_implementation == "sdpa"
    for l in LAYERS:
        torch.testing.assert_close(tap.signals["cls_attn"][l], attn[l][:, :, 0, 1:].mean(1), atol=1e-5, rtol=0)
        torch.testing.assert_close(tap.signals["cls_logits"][l], logits[l][:, :, 0, 1:].mean(1), atol=1e-5, rtol=0)
        torch.testing.assert_close(tap.signals["keys"][l], keys[l][:, 1:], atol=1e-5, rtol=0)
        torch.testing.assert_close(tap.signals["hidden"][l], hidden[l + 1][:, 1:], atol=1e-5, rtol=0)
    assert tap.signals["cls_attn"][0].shape == (2, 16) and tap.signals["cls_attn"][0].dtype == torch.float32
    assert tap.signals["keys"][0].shape == (2, 16, d)
    assert tap.signals["hidden"][0].shape == (2, 16, D)


def test_clip_outputs_bit_identical_with_tap(clip, pixels):
    with torch.no_grad():
        want = clip(pixels, output_hidden_states=True)
        with attach(clip, ALL):
            got = clip(pixels, output_hidden_states=True)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert torch.equal(got.pooler_output, want.pooler_output)
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, want.hidden_states))


def test_remove_leaves_no_hook_or_attribute(clip, pixels, snapshot):
    before = snapshot(clip)
    tap = attach(clip, ALL)
    assert snapshot(clip) != before  # the snapshot sees hooks
    with torch.no_grad():
        clip(pixels)
    tap.remove()
    assert snapshot(clip) == before
    with attach(clip, {"cls_attn": [1], "keys": [2]}):
        pass
    assert snapshot(clip) == before
    tap.remove()  # idempotent


def test_negative_layers_are_recorded_under_their_non_negative_number(clip, pixels):
    with attach(clip, {"cls_attn": [-1, 3, -4], "cls_logits": [-2]}) as tap, torch.no_grad():
        clip(pixels)
    assert tap.requires == {"cls_attn": [0, 3], "cls_logits": [2]}
    assert sorted(tap.signals["cls_attn"]) == [0, 3] and sorted(tap.signals["cls_logits"]) == [2]


@pytest.mark.parametrize("layer", [4, -5, 100])
def test_nonexistent_layer_raises_with_the_valid_range(clip, layer, snapshot):
    before = snapshot(clip)
    with pytest.raises(TapError, match=r"0\.\.3"):
        attach(clip, {"keys": [1], "cls_attn": [layer]})
    assert snapshot(clip) == before


def test_siglip_keys_and_hidden_equal_eager(siglip, pixels):
    _, _, keys, hidden = eager_reference(siglip, pixels)
    with attach(siglip, {"keys": LAYERS, "hidden": [-1]}) as tap, torch.no_grad():
        out = siglip(pixels)
    for l in LAYERS:  # no CLS: every one of the 16 tokens is a patch token
        torch.testing.assert_close(tap.signals["keys"][l], keys[l], atol=1e-5, rtol=0)
    assert tap.signals["keys"][0].shape == (2, 16, d)
    torch.testing.assert_close(tap.signals["hidden"][3], hidden[4], atol=1e-5, rtol=0)
    assert tap.num_prefix_tokens == 0 and not tap.has_cls
    with torch.no_grad():
        assert torch.equal(out.last_hidden_state, siglip(pixels).last_hidden_state)


@pytest.mark.parametrize("signal", ["cls_attn", "cls_logits"])
def test_siglip_cls_signal_raises(siglip, signal):
    with pytest.raises(TapError, match="no CLS token"):
        attach(siglip, {signal: [1]})


def test_unknown_hf_attention_is_refused():
    torch.manual_seed(0)
    model = CLIPVisionModel(_config(CLIPVisionConfig))
    model.encoder.layers[1].self_attn = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="uses Identity"):
        attach(model, {"keys": [0]})


def test_llava_model_itself_is_refused_with_a_hint():
    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = torch.nn.Identity()

    class LlavaLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

    LlavaLike.__module__ = "transformers.models.llava.modeling_llava"
    with pytest.raises(UnsupportedModelError, match="model.model.vision_tower"):
        attach(LlavaLike(), {"keys": [0]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_gpu_matches_eager(clip, pixels, dtype):
    model = copy.deepcopy(clip).to("cuda", dtype)
    x = pixels.to("cuda", dtype)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attn = eager(x, output_attentions=True).attentions
        want = model(x).last_hidden_state
        with attach(model, {"cls_attn": LAYERS, "keys": LAYERS}) as tap:
            got = model(x).last_hidden_state
    assert torch.equal(got, want)
    for l in LAYERS:
        torch.testing.assert_close(tap.signals["cls_attn"][l], attn[l][:, :, 0, 1:].float().mean(1), atol=1e-2, rtol=0)
        assert tap.signals["keys"][l].dtype == dtype
