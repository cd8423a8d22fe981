"""Selection primitives (vtc/ops/selection.py): ranked order, variable k per image, masks."""

import torch

from vtc import VisualTokens
from vtc.ops.selection import descending_order, first_k, keep_top, mask_from_order


def test_descending_order_ties_padding_and_nan():
    s = torch.tensor([[0.5, 0.9, 0.5, float("nan"), 0.9, float("-inf")]])
    # ties keep position order; a NaN score ranks below every number, -inf included
    assert descending_order(s).tolist() == [[1, 4, 0, 2, 5, 3]]
    valid = torch.tensor([[True, True, True, True, False, True]])
    # padding goes last, after real tokens whose score is -inf or NaN
    assert descending_order(s, valid).tolist() == [[1, 0, 2, 5, 3, 4]]


def test_first_k_per_row():
    order = torch.tensor([[3, 1, 0, 2], [2, 0, 1, 3]])
    idx, valid = first_k(order, torch.tensor([1, 3]))
    assert idx.tolist() == [[3, 1, 0], [2, 0, 1]] and valid.tolist() == [[True, False, False], [True] * 3]


def test_mask_from_order_ignores_entries_past_k_even_if_repeated():
    # row 0 keeps all 3 of its tokens; its order then repeats its last pick (as DivPrune's does)
    order = torch.tensor([[2, 0, 1, 1, 1], [4, 3, 0, 1, 2]])
    m = mask_from_order(order, torch.tensor([3, 4]), 5)
    assert m.tolist() == [[True, True, True, False, False], [True, True, False, True, True]]
    assert mask_from_order(order, torch.tensor([0, 5])).tolist() == [[False] * 5, [True] * 5]


def test_keep_top_orders():
    t = VisualTokens(x=torch.randn(2, 5, 2), index=torch.tensor([[10, 11, 12, 13, 14]] * 2))
    s = torch.tensor([[0.1, 0.7, 0.3, 0.9, 0.2], [5.0, 4.0, 3.0, 2.0, 1.0]])
    k = torch.tensor([3, 2])
    kept = keep_top(t, s, k)
    assert kept.index[0].tolist() == [11, 12, 13] and kept.index[1, :2].tolist() == [10, 11]
    by_score = keep_top(t, s, k, order="score")
    assert by_score.index[0].tolist() == [13, 11, 12] and by_score.counts.tolist() == [3, 2]
