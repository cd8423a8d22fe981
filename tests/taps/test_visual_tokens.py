"""vtc.taps.visual_tokens: to_tokens turns a tapped tower's output into VisualTokens operators consume."""

import pytest
import torch

pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

import vtc  # noqa: E402
from vtc.errors import InputError, TapError  # noqa: E402
from vtc.taps import attach, to_tokens  # noqa: E402


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                           image_size=40, patch_size=8)
    return CLIPVisionModel(cfg).eval()


def test_hf_features_become_patch_tokens_with_signals(clip):
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad(), attach(clip, {"cls_attn": [1, 2], "hidden": [2]}) as tap:
        out = clip(x, output_hidden_states=True)
    tokens = to_tokens(out.hidden_states[-2], tap)
    assert torch.equal(tokens.x, out.hidden_states[-2][:, 1:])  # CLS dropped
    assert tokens.x.shape == (2, 25, 32)
    assert torch.equal(tokens.index, torch.arange(25).expand(2, 25))
    assert tokens.layout == vtc.Layout.grid(5)
    assert tokens.signals["cls_attn"][1] is tap.signals["cls_attn"][1]
    # patch-only features (the hidden signal of the same layer) give the same tokens
    same = to_tokens(tap.signals["hidden"][2], tap)
    assert torch.equal(same.x, tokens.x)
    explicit = to_tokens(out.hidden_states[-2], tap, layout=vtc.Layout.grid(1, 25))
    assert explicit.layout == vtc.Layout.grid(1, 25)


def test_vtc_cls_pipeline_runs_on_tapped_tokens(clip):
    x = torch.randn(3, 3, 40, 40)
    pipe = vtc.build([{"op": "vtc-cls", "keep": 6, "layers": [1, 2, 3]}])
    with torch.no_grad(), attach(clip, pipe.requires) as tap:
        out = clip(x, output_hidden_states=True)
    kept = pipe(to_tokens(out.hidden_states[-2], tap))
    score = sum(tap.signals["cls_attn"][l] for l in (1, 2, 3))
    for b in range(3):  # brute force: the 6 highest scores, in raster order
        want = sorted(range(25), key=lambda j: -float(score[b, j]))[:6]
        assert kept.index[b].tolist() == sorted(want)
        assert torch.equal(kept.x[b], out.hidden_states[-2][b, 1:][sorted(want)])


def test_timm_registers_and_non_square_grid():
    torch.manual_seed(1)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=(32, 48), patch_size=8, embed_dim=32,
                              depth=2, num_heads=4, reg_tokens=2, num_classes=0).eval()
    with torch.no_grad(), attach(model, {"keys": [-1]}) as tap:
        feats = model.forward_features(torch.randn(1, 3, 32, 48))
    tokens = to_tokens(feats, tap)
    assert feats.shape[1] == 27 and tokens.x.shape == (1, 24, 32)
    assert torch.equal(tokens.x, feats[:, 3:])  # CLS and both registers dropped
    assert tokens.layout == vtc.Layout.grid(4, 6)
    assert tokens.signals["keys"][1].shape == (1, 24, 8)


def test_bad_inputs_raise(clip):
    tap = attach(clip, {"cls_attn": [1]})
    try:
        with pytest.raises(TapError, match="no forward"):
            to_tokens(torch.randn(1, 26, 32), tap)
        with torch.no_grad():
            clip(torch.randn(1, 3, 40, 40))
        with pytest.raises(InputError, match="24 tokens"):
            to_tokens(torch.randn(1, 24, 32), tap)
        with pytest.raises(InputError, match="tensor"):
            to_tokens([1, 2], tap)
    finally:
        tap.remove()
