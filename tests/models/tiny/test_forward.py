"""tiny forward: equals the HF model on processor inputs; subsets, positions and eval budgets."""

import torch

from vtc.models.tiny import vocab
from vtc.models.tiny.batch import eval_batch, split_counts, train_batch
from vtc.models.tiny.datasets import dataset
from vtc.models.tiny.evaluate import answer_logits, evaluate
from vtc.models.tiny.forward import assemble, encode_images, lm_hidden, random_subset
from vtc.models.tiny.variants import build_model, variant


def _hf_last_logits(model, proc, items):
    out = []
    for it in items:
        inp = proc(images=[it.image], text=[vocab.prompt(it.question)], return_tensors="pt")
        out.append(model(**inp).logits[0, -1])
    return torch.stack(out)


@torch.no_grad()
def test_forward_equals_hf_forward_llava_and_next(small, small_next):
    for name, spec, ds in (("tiny-llava", small, "shapes"), ("tiny-llava-next", small_next, "shapes-large")):
        model, proc = build_model(variant(name, **spec))
        items = dataset(ds).items("val", limit=3)
        b = eval_batch(proc, items)
        mine, n = answer_logits(model, b)
        assert torch.allclose(mine, _hf_last_logits(model, proc, items), atol=1e-5), name
        # the processor's <image> run has exactly as many tokens as the forward builds
        ids = proc(images=[items[0].image], text=[vocab.prompt(items[0].question)])["input_ids"][0]
        assert ids.count(proc.tokenizer.convert_tokens_to_ids("<image>")) == int(n[0])


def test_training_text_is_the_processor_text(small):
    model, proc = build_model(variant("tiny-llava", **small))
    b = train_batch(variant("tiny-llava", **small), proc, 3)
    tok = proc.tokenizer
    words = tok.convert_ids_to_tokens(b.suffix[0, :int(b.lengths[0])].tolist())
    assert tok.unk_token not in words and words.count("assistant") == b.target[0].sum() / 2
    tgt = tok.convert_ids_to_tokens(b.suffix[0][b.target[0]].tolist())
    assert tgt[1::2] == ["</s>"] * (len(tgt) // 2) and tgt[0] == b.answers[0]
    first = tok(vocab.prompt("q") + " a" + vocab.EOS)["input_ids"]
    assert b.prefix.tolist() == first[:first.index(tok.convert_tokens_to_ids("<image>"))]
    assert split_counts(16, (("shapes", 0.75), ("easy-vqa", 0.25))) == [("shapes", 12), ("easy-vqa", 4)]


def test_random_subset_is_sorted_valid_and_seeded():
    valid = torch.tensor([[True] * 10, [True] * 4 + [False] * 6])
    idx, ok = random_subset(valid, 6, torch.Generator().manual_seed(0))
    idx2, ok2 = random_subset(valid, 6, torch.Generator().manual_seed(0))
    assert torch.equal(idx, idx2) and torch.equal(ok, ok2)
    assert ok.sum(1).tolist() == [6, 4]
    assert torch.equal(idx[1][ok[1]], torch.arange(4))
    assert bool((idx[0].diff() > 0).all()) and len(set(idx[0].tolist())) == 6


@torch.no_grad()
def test_original_positions(small):
    model, _ = build_model(variant("tiny-llava", **small))
    D = model.config.text_config.hidden_size
    prefix = torch.tensor([1, 5, 6])
    vis = torch.randn(1, 4, D)
    suffix = torch.tensor([[7, 8, 9]])
    kept = torch.tensor([[2, 9, 30, 63]])
    _, pos, start = assemble(model, prefix, vis, torch.ones(1, 4, dtype=torch.bool), suffix, torch.tensor([3]),
                             vis_pos=kept, n_full=torch.tensor([64]))
    assert pos[0].tolist() == [0, 1, 2, 5, 12, 33, 66, 67, 68, 69] and int(start[0]) == 7
    # keeping every token with original positions is the contiguous sequence
    full = torch.randn(1, 64, D)
    x1, p1, _ = assemble(model, prefix, full, torch.ones(1, 64, dtype=torch.bool), suffix, torch.tensor([3]),
                         vis_pos=torch.arange(64)[None], n_full=torch.tensor([64]))
    x2, p2, _ = assemble(model, prefix, full, torch.ones(1, 64, dtype=torch.bool), suffix, torch.tensor([3]))
    assert torch.equal(p1, p2) and torch.equal(x1, x2)
    h = lm_hidden(model, x2, p2)
    assert h.shape == (1, 70, D)


@torch.no_grad()
def test_evaluate_budgets(small):
    model, proc = build_model(variant("tiny-llava", **small))
    items = dataset("shapes").items("val", limit=8)
    full = evaluate(model, proc, items, batch_size=4)
    assert full.total == 8 and full.tokens == 64 and set(full.by_type) == {"count", "exist", "attribute", "spatial"}
    # a pipeline that keeps every token is the full model; uniform:keep=16 feeds 16 tokens
    b = eval_batch(proc, items[:4])
    a, _ = answer_logits(model, b)
    c, n = answer_logits(model, b, pipeline=__import__("vtc").build("uniform:keep=64"))
    assert torch.allclose(a, c, atol=1e-5) and n.tolist() == [64] * 4
    assert evaluate(model, proc, items, pipeline="uniform:keep=16").tokens == 16
    assert evaluate(model, proc, items, subset=10).tokens == 10
    vo = encode_images(model, b.pixel_values)
    assert vo.tokens.shape == (4, 64, 32) and vo.cls.shape == (4, 16)
