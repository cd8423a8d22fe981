"""tiny training: loss goes down, a resumed run is bit-identical, exports load with from_pretrained, MQT trains."""

import json

import pytest
import torch

import vtc
from vtc.errors import ConfigError
from vtc.models.tiny import vocab
from vtc.models.tiny.batch import eval_batch, train_batch
from vtc.models.tiny.datasets import dataset
from vtc.models.tiny.evaluate import answer_logits, evaluate
from vtc.models.tiny.forward import assemble, encode_images, lm_hidden, loss_and_logits, tower
from vtc.models.tiny.loading import load
from vtc.models.tiny.train import RunConfig, Trainer, lr_at, train

RECIPE = dict(batch=4, turns=3, lr=3e-3, warmup=2, prune_share=0.5, prune_min=4)


def _cfg(out, small, steps=8, **kw):
    return RunConfig("tiny-llava", steps=steps, out=str(out), spec=small, recipe=dict(RECIPE), threads=None,
                     log_every=100, save_every=100, quiet=True, **kw)


@torch.no_grad()
def _heldout_loss(t: Trainer) -> float:
    """Full-token LM loss on a training batch no run here reaches (step 10_000)."""
    t.model.eval()
    b = train_batch(t.v, t.processor, 10_000)
    vo = encode_images(t.model, b.pixel_values)
    x, pos, start = assemble(t.model, b.prefix, vo.tokens, vo.valid, b.suffix, b.lengths)
    out = float(loss_and_logits(t.model, lm_hidden(t.model, x, pos), start, b.suffix, b.target))
    t.model.train()
    return out


def _state(t: Trainer) -> dict[str, torch.Tensor]:
    out = {f"p.{k}": v for k, v in t.model.state_dict().items()}
    for i, st in t.opt.state_dict()["state"].items():
        out.update({f"o.{i}.{k}": v for k, v in st.items()})
    return out


def test_loss_decreases_and_resume_is_bit_exact(tmp_path, small):
    fresh = Trainer(_cfg(tmp_path / "x", small))
    before = _heldout_loss(fresh)
    a = train(_cfg(tmp_path / "a", small))
    after = _heldout_loss(a)
    assert after < before - 0.3, (before, after)
    assert a.step_no == 8 and (tmp_path / "a" / "final" / "model.safetensors").is_file()
    # the same run in two chunks: the first stops after one step (time limit), the second resumes
    b1 = train(_cfg(tmp_path / "b", small, max_minutes=0.0))
    assert b1.step_no == 1 and not (tmp_path / "b" / "final").exists()
    with pytest.raises(ConfigError, match="--resume"):
        train(_cfg(tmp_path / "b", small))
    b = train(_cfg(tmp_path / "b", small, resume=True))
    assert b.step_no == 8
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    info = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert info["step"] == 8 and info["variant"] == "tiny-llava"
    # the schedule warms up, peaks at lr and decays to min_lr_ratio * lr at the end
    r = a.recipe
    assert lr_at(0, 8, r) < lr_at(1, 8, r) == pytest.approx(r.lr) and lr_at(8, 8, r) == pytest.approx(0.1 * r.lr)


def test_export_round_trip_with_from_pretrained(tmp_path, small):
    t = train(_cfg(tmp_path / "run", small, steps=2))
    tm = load(str(tmp_path / "run" / "final"))
    assert tm.family == "llava" and tm.mqt is None and next(tm.model.parameters()).dtype == torch.float32
    items = dataset("easy-vqa").items("test", limit=3) + dataset("shapes").items("test", limit=3)
    # the reloaded processor makes the same inputs (word-level tokenizer, image token, padding side)
    texts = [vocab.prompt(it.question) for it in items]
    p0 = t.processor(images=[i.image for i in items], text=texts, return_tensors="pt", padding=True)
    p1 = tm.processor(images=[i.image for i in items], text=texts, return_tensors="pt", padding=True)
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)
    assert tm.processor.tokenizer.padding_side == "left"
    assert tm.processor.tokenizer.unk_token_id not in p1["input_ids"].tolist()
    with torch.no_grad():
        t.model.eval()
        ref = t.model(**p0).logits
        assert torch.allclose(tm.model(**p1).logits, ref, atol=1e-5)
        b = eval_batch(tm.processor, items)
        assert torch.allclose(answer_logits(tm.model, b)[0], answer_logits(t.model, b)[0], atol=1e-5)
    info = json.loads((tmp_path / "run" / "final" / "train_info.json").read_text())
    assert info["step"] == 2 and info["variant"] == "tiny-llava"


def test_mqt_trains_from_tiny_llava_and_serves_any_budget(tmp_path, small):
    train(_cfg(tmp_path / "llava", small, steps=1))
    with pytest.raises(ConfigError, match="--init"):
        Trainer(RunConfig("tiny-mqt", steps=2, out=str(tmp_path / "m0"), spec=small, init=str(tmp_path / "none")))
    t = train(RunConfig("tiny-mqt", steps=3, out=str(tmp_path / "mqt"), spec=small, init=str(tmp_path / "llava/final"),
                        recipe=dict(batch=4, turns=2), threads=None, quiet=True))
    # the tower stayed frozen at tiny-llava's weights
    src = load(str(tmp_path / "llava" / "final")).model
    for (k, v), (k2, v2) in zip(src.model.vision_tower.state_dict().items(),
                                t.model.model.vision_tower.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    final = tmp_path / "mqt" / "final"
    tm = load(str(final))
    assert tm.mqt is not None and tm.mqt.queries == 256
    items = dataset("shapes").items("test", limit=4)
    b = eval_batch(tm.processor, items)
    with torch.no_grad():
        feats, _ = tower(tm.model, b.pixel_values)
        op = vtc.build(f"mqt:keep=16,weights={final}")[0]
        out = op(vtc.VisualTokens(x=feats, layout=vtc.Layout.grid(8)))
        assert torch.allclose(out.x, tm.mqt(feats, 16), atol=1e-6)
        assert torch.allclose(out.x, t.mqt(feats, 256)[:, :16], atol=1e-5)
    acc = evaluate(tm.model, tm.processor, items, mqt=tm.mqt, m=16)
    assert acc.total == 4 and acc.tokens == 16
    assert evaluate(tm.model, tm.processor, items, pipeline=f"mqt:keep=8,weights={final}").tokens == 8


def test_next_starts_from_tiny_llava_and_steps_with_finite_losses(tmp_path, small, small_next):
    """tiny-llava-next is initialised from a trained tiny-llava: every shared weight copied, the
    tower's position embeddings resized to its grid (8x8 -> 16x16 here), the newline vector new."""
    train(_cfg(tmp_path / "llava", small, steps=1))
    with pytest.raises(ConfigError, match="--init"):
        Trainer(RunConfig("tiny-llava-next", steps=2, out=str(tmp_path / "n0"), spec=small_next,
                          init=str(tmp_path / "none")))
    t = Trainer(RunConfig("tiny-llava-next", steps=4, out=str(tmp_path / "next"), spec=small_next,
                          init=str(tmp_path / "llava" / "final"), recipe=dict(batch=2, turns=2, prune_share=0.0),
                          threads=None))
    src = load(str(tmp_path / "llava" / "final")).model.state_dict()
    dst = t.model.state_dict()
    pos = "model.vision_tower.embeddings.position_embedding.weight"
    for k, v in src.items():
        if k != pos:
            assert torch.equal(dst[k], v), k
    assert dst[pos].shape == (1 + 16 * 16, small["vision_hidden"]) and torch.equal(dst[pos][0], src[pos][0])
    grid = src[pos][1:].T.reshape(1, -1, 8, 8)
    want = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    assert torch.allclose(dst[pos][1:], want.reshape(small["vision_hidden"], -1).T)
    assert "model.image_newline" in dst and "model.image_newline" not in src
    rec = t.step()
    assert rec["kept"] >= 5 * 256 and torch.isfinite(torch.tensor([rec["loss"], rec["aux"]])).all() and rec["aux"] > 0
