"""vtc.integrations.compaction: which prompt positions survive, re-padding, positions, labels, decoding."""

from __future__ import annotations

import pytest
import torch

from vtc.errors import InputError
from vtc.integrations import compaction

IMG, PAD = 9, 0


def _batch(rows, pad_left=True):
    """input_ids and attention_mask from lists of token lists (IMG marks placeholders)."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), PAD)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(L - len(r), L) if pad_left else slice(0, len(r))
        ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
    return ids, mask


def _reference(ids, mask, stock, kept, pad_left):
    """Brute force: walk the placeholders in (row, position) order and keep each image's first k."""
    keep = torch.ones_like(ids, dtype=torch.bool)
    img, used = 0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if ids[b, t] == IMG:
                keep[b, t] = used < kept[img]
                used += 1
                if used == stock[img]:
                    img, used = img + 1, 0
    rows = [[t for t in range(ids.shape[1]) if keep[b, t]] for b in range(ids.shape[0])]
    Lc = max(len(r) for r in rows)
    src = [([None] * (Lc - len(r)) + r) if pad_left else (r + [None] * (Lc - len(r))) for r in rows]
    return keep, src


@pytest.mark.parametrize("pad_left", [True, False])
def test_plan_matches_a_brute_force_walk(pad_left):
    # row 0: two images (3 and 4 placeholders); row 1: one image of 5; row 2: text only; row 3: one of 3
    rows = [[1, IMG, IMG, IMG, 2, IMG, IMG, IMG, IMG, 3], [1, IMG, IMG, IMG, IMG, IMG, 4], [1, 5, 6],
            [7, IMG, IMG, IMG]]
    stock = [3, 4, 5, 3]
    kept = torch.tensor([1, 4, 2, 0])
    ids, mask = _batch(rows, pad_left)
    plan = compaction.plan(ids, mask, IMG, stock, kept)
    keep, src = _reference(ids, mask, stock, kept.tolist(), pad_left)
    assert torch.equal(plan.keep, keep)
    for b, r in enumerate(src):
        got = [int(s) if v else None for s, v in zip(plan.src[b], plan.slot_valid[b])]
        assert got == r
    new_ids = plan.ids(ids, PAD)
    assert ((new_ids == IMG).sum(1)).tolist() == [1 + 4, 2, 0, 0]
    new_mask = plan.attention_mask(mask)
    assert torch.equal(new_mask.bool(), plan.slot_valid & mask.gather(1, plan.src).bool())
    assert plan.dropped.tolist() == [2, 3, 0, 3]


def test_positions_contiguous_and_original():
    ids, mask = _batch([[1, IMG, IMG, IMG, IMG, 2, 3], [4, IMG, IMG, IMG, IMG, 5]])
    plan = compaction.plan(ids, mask, IMG, [4, 4], torch.tensor([1, 3]))
    pos = (mask.cumsum(1) - 1).clamp_min(0)  # generate()'s positions
    orig = plan.position_ids(pos, "original")
    cont = plan.position_ids(pos, "contiguous")
    v = plan.attention_mask(mask).bool()  # real tokens (row 1 keeps its original left pad)
    assert orig[0][v[0]].tolist() == [0, 1, 5, 6]  # gaps where 3 placeholders went
    assert cont[0][v[0]].tolist() == [0, 1, 2, 3]
    assert orig[1][v[1]].tolist() == [0, 1, 2, 3, 5]
    assert cont[1][v[1]].tolist() == [0, 1, 2, 3, 4]
    # HF's default positions (arange over the padded row) are compacted the same way
    assert plan.position_ids(None, "contiguous")[1][v[1]].tolist() == [1, 2, 3, 4, 5]
    assert plan.position_ids(None, "original")[0][v[0]].tolist() == [0, 1, 5, 6]


def test_labels_follow_the_tokens_and_padding_is_ignored():
    ids, mask = _batch([[1, IMG, IMG, 2, 3], [4, IMG, IMG, 5]])
    labels = torch.where(ids == IMG, torch.full_like(ids, -100), ids)
    plan = compaction.plan(ids, mask, IMG, [2, 2], torch.tensor([1, 2]))
    lab = plan.labels(labels)
    # row 0 gets a new left pad (label -100); row 1 keeps its original pad (label = its id, masked)
    assert lab.tolist() == [[-100, 1, -100, 2, 3], [PAD, 4, -100, -100, 5]]
    assert plan.ids(ids, PAD).tolist() == [[PAD, 1, IMG, 2, 3], [PAD, 4, IMG, IMG, 5]]
    assert plan.attention_mask(mask).tolist() == [[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]]


def test_no_mask_and_equal_lengths_needs_no_mask():
    ids = torch.tensor([[1, IMG, IMG, 2], [3, IMG, IMG, 4]])
    plan = compaction.plan(ids, None, IMG, [2, 2], torch.tensor([1, 1]))
    assert plan.attention_mask(None) is None
    plan = compaction.plan(ids, None, IMG, [2, 2], torch.tensor([1, 2]))
    assert plan.attention_mask(None).tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]


def test_wrong_placeholder_count_and_split_runs_are_input_errors():
    ids = torch.tensor([[1, IMG, IMG, 2], [3, IMG, IMG, 4]])
    with pytest.raises(InputError, match="holds 4 image placeholder tokens"):
        compaction.plan(ids, None, IMG, [3], torch.tensor([1]))
    with pytest.raises(InputError, match="span two batch rows"):
        compaction.plan(ids, None, IMG, [1, 3], torch.tensor([1, 1]))
    with pytest.raises(InputError, match="room for"):
        compaction.plan(ids, None, IMG, [2, 2], torch.tensor([3, 1]))


@pytest.mark.parametrize("mode", ["contiguous", "original"])
def test_decode_state_maps_masks_and_positions(mode):
    ids, mask = _batch([[1, IMG, IMG, IMG, 2], [IMG, IMG, IMG, 3]])
    plan = compaction.plan(ids, mask, IMG, [3, 3], torch.tensor([1, 2]))
    state = compaction.DecodeState(prompt_length=5, compact_length=plan.length,
                                   prompt_mask=plan.attention_mask(mask), dropped=plan.dropped, mode=mode)
    Lc = plan.length  # 4: row 0 keeps 3 tokens, row 1 its pad and 3 tokens
    assert Lc == 4
    cache = Lc + 2  # two tokens decoded so far
    full = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1)  # over the original length
    got = state.attention_mask(full, cache, 1)
    assert torch.equal(got, torch.cat([plan.attention_mask(mask), torch.ones(2, 3, dtype=torch.long)], 1))
    assert torch.equal(state.attention_mask(got, cache, 1), got)  # already compact: unchanged
    with pytest.raises(InputError, match="attention_mask covers"):
        state.attention_mask(full[:, 2:], cache, 1)
    pos = full.sum(1, keepdim=True) - 1  # generate()'s next position: original numbering
    want = pos if mode == "original" else pos - plan.dropped.unsqueeze(1)
    assert torch.equal(state.position_ids(pos, cache, 1, pos.device), want)


def test_decode_mask_when_compaction_keeps_the_batch_length():
    """Row 1 drops nothing, so the compacted batch keeps length L while row 0 gains left padding: a
    mask over the original sequence (as generate() passes it) must still get the compacted prompt mask."""
    ids, mask = _batch([[1, IMG, IMG, IMG, 2], [IMG, 3]])
    plan = compaction.plan(ids, mask, IMG, [3, 1], torch.tensor([1, 1]))
    assert plan.length == 5 and plan.dropped.tolist() == [2, 0]
    state = compaction.DecodeState(prompt_length=5, compact_length=5, prompt_mask=plan.attention_mask(mask),
                                   dropped=plan.dropped, mode="original")
    full = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    got = state.attention_mask(full, 5, 1)
    assert got[0].tolist() == [0, 0, 1, 1, 1, 1] and torch.equal(got[:, :5], plan.attention_mask(mask))
    assert torch.equal(state.attention_mask(got, 5, 1), got)  # a compacted mask maps to itself


def test_visual_index_and_token_source_per_slot():
    """Each slot's visual-token index and its token's place in the stock prompt (brute force)."""
    ids, mask = _batch([[1, IMG, IMG, IMG, IMG, 2], [IMG, IMG, 3, IMG, IMG]])
    plan = compaction.plan(ids, mask, IMG, [4, 2, 2], torch.tensor([2, 1, 2]))
    index = torch.tensor([[3, 1], [1, 0], [0, 1]])  # kept tokens of each image, in sequence order
    vis, src = plan.visual_index(index), plan.token_source(index)
    starts = [(b, p) for b in range(2) for p in range(ids.shape[1])
              if ids[b, p] == IMG and (p == 0 or ids[b, p - 1] != IMG)]  # image i's run, in (row, position) order
    want_vis, want_src = [], []
    for b in range(2):
        row_v, row_s, seen = [], [], {}
        for s_, p in zip(plan.slot_valid[b].tolist(), plan.src[b].tolist()):
            if not s_:
                row_v.append(-1), row_s.append(0)
                continue
            if ids[b, p] == IMG:
                start = p
                while start > 0 and ids[b, start - 1] == IMG:
                    start -= 1
                img = starts.index((b, start))
                j = seen.get(img, 0)
                seen[img] = j + 1
                row_v.append(int(index[img, j])), row_s.append(start + int(index[img, j]))
            else:
                row_v.append(-1), row_s.append(p)
        want_vis.append(row_v), want_src.append(row_s)
    assert vis.tolist() == want_vis and src.tolist() == want_src
