"""VisualTokens and Layout: defaults, validation, and that every helper keeps fields aligned."""

import pytest
import torch

from vtc import Layout, VisualTokens
from vtc.errors import InputError, LayoutError, SignalError, VtcError
from vtc.tokens import SIGNAL_MERGE_RULES


def _tokens(B=2, N=6, D=3, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    return VisualTokens(x=x, **kw)


def _full(B=2, N=6, D=3, seed=0):
    """Tokens with every field set to distinguishable values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    return VisualTokens(
        x=x,
        index=torch.arange(N).repeat(B, 1) * 10,
        size=torch.arange(1, N + 1, dtype=torch.float64).repeat(B, 1),
        group=(torch.arange(N) % 2).repeat(B, 1),
        signals={
            "cls_attn": {22: torch.rand(B, N, generator=g, dtype=torch.float64)},
            "keys": {22: torch.randn(B, N, 4, generator=g, dtype=torch.float64)},
        },
        budget=torch.tensor([[2, 1]] * B),
    )


def _row(t, b):
    """Image ``b``'s valid tokens, every field, as plain tensors keyed by field name."""
    n = int(t.counts[b])
    out = {"x": t.x[b, :n], "index": t.index[b, :n], "size": t.sizes[b, :n]}
    if t.group is not None:
        out["group"] = t.group[b, :n]
    for name, per_layer in t.signals.items():
        for layer, s in per_layer.items():
            out[f"{name}[{layer}]"] = s[b, :n]
    return out


def _assert_rows_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------- construction
def test_features_alone_give_defaults():
    x = torch.randn(2, 5, 3)
    t = VisualTokens(x=x)
    assert t.x is x
    assert t.mask is None and t.size is None and t.group is None and t.layout is None and t.budget is None
    assert t.signals == {}
    assert t.index.tolist() == [list(range(5))] * 2 and t.index.dtype == torch.long
    assert t.counts.tolist() == [5, 5] and t.valid.all()
    assert t.sizes.tolist() == [[1.0] * 5] * 2 and t.sizes.dtype == x.dtype
    assert (t.batch_size, t.num_tokens, t.dim, t.num_groups) == (2, 5, 3, 1)


def test_2d_features_are_one_image():
    t = VisualTokens(x=torch.randn(5, 3))
    assert t.x.shape == (1, 5, 3) and t.index.shape == (1, 5)


def test_fields_are_normalised():
    t = VisualTokens(x=torch.randn(1, 3, 2), index=torch.tensor([[4, 5, 6]], dtype=torch.int32),
                     size=torch.tensor([[1, 2, 3]]), budget=torch.tensor([2]))
    assert t.index.dtype == torch.long
    assert t.size.dtype == torch.float32 and t.size.tolist() == [[1.0, 2.0, 3.0]]
    assert t.budget.shape == (1, 1) and t.budget.dtype == torch.long


def test_all_true_mask_becomes_none():
    assert VisualTokens(x=torch.randn(2, 3, 2), mask=torch.ones(2, 3, dtype=torch.bool)).mask is None


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(x=[[1.0]]), "torch.Tensor"),
        (dict(x=torch.ones(2, 3, dtype=torch.long)), "floating"),
        (dict(x=torch.ones(1, 2, 3, 4)), "shape"),
        (dict(x=torch.ones(2, 3, 4), index=torch.zeros(2, 4, dtype=torch.long)), "index"),
        (dict(x=torch.ones(2, 3, 4), index=torch.zeros(2, 3)), "integer"),
        (dict(x=torch.ones(2, 3, 4), mask=torch.ones(2, 3)), "bool"),
        (dict(x=torch.ones(2, 3, 4), size=torch.ones(2, 2)), "size"),
        (dict(x=torch.ones(2, 3, 4), group=torch.zeros(2, 3, dtype=torch.bool)), "integer"),
        (dict(x=torch.ones(2, 3, 4), signals={"cls_attn": torch.ones(2, 3)}), "layer number"),
        (dict(x=torch.ones(2, 3, 4), signals={"cls_attn": {22: torch.ones(2, 4)}}), "cls_attn"),
        (dict(x=torch.ones(2, 3, 4), budget=torch.ones(3, 1, dtype=torch.long)), "budget"),
        (dict(x=torch.ones(2, 3, 4), budget=torch.ones(2, 1)), "budget"),
        (dict(x=torch.ones(2, 3, 4), budget=torch.tensor([[1], [-1]])), "negative"),
        (dict(x=torch.ones(2, 3, 4), layout=[Layout.grid(1, 3)]), "layouts"),
        (dict(x=torch.ones(2, 3, 4), layout="24x24"), "vtc.Layout"),
    ],
)
def test_validation_errors(kwargs, words):
    with pytest.raises(VtcError, match=words):
        VisualTokens(**kwargs)


def test_layout_validation_and_helpers():
    with pytest.raises(LayoutError):
        Layout(grids=())
    with pytest.raises(LayoutError):
        Layout(grids=((0, 3),))
    with pytest.raises(LayoutError, match="5 partitions"):
        Layout(grids=((24, 24),) * 3, anyres=(2, 2))
    with pytest.raises(LayoutError, match="square"):
        Layout.square(10)
    assert Layout.square(576) == Layout.grid(24) == Layout(grids=((24, 24),))
    lay = Layout.for_anyres(24, (2, 2), image_size=(480, 640))
    assert lay.num_partitions == 5 and lay.offsets == (0, 576, 1152, 1728, 2304) and lay.num_tokens == 2880
    assert Layout(grids=((2, 3), (4, 5))).offsets == (0, 6)


# ---------------------------------------------------------------------- left packing
def test_mask_is_left_packed_with_every_field():
    t = _full(B=2, N=6)
    mask = torch.tensor([[False, True, False, True, True, False], [True] * 6])
    p = VisualTokens(x=t.x, mask=mask, index=t.index, size=t.size, group=t.group, signals=t.signals,
                     budget=t.budget)
    assert p.mask.tolist() == [[True, True, True, False, False, False], [True] * 6]
    assert p.index[0, :3].tolist() == [10, 30, 40]
    keep = [1, 3, 4]
    torch.testing.assert_close(p.x[0, :3], t.x[0, keep], rtol=0, atol=0)
    torch.testing.assert_close(p.size[0, :3], t.size[0, keep], rtol=0, atol=0)
    assert p.group[0, :3].tolist() == t.group[0, keep].tolist()
    torch.testing.assert_close(p.signals["keys"][22][0, :3], t.signals["keys"][22][0, keep], rtol=0, atol=0)
    torch.testing.assert_close(p.signals["cls_attn"][22][0, :3], t.signals["cls_attn"][22][0, keep], rtol=0, atol=0)
    _assert_rows_equal(_row(p, 1), _row(t, 1))
    assert p.x[0, 3:].abs().sum() == 0  # padding is zeroed
    assert p.budget.tolist() == t.budget.tolist()


# ---------------------------------------------------------------------- keeping
def test_gather_keeps_every_field_and_budget():
    t = _full()
    idx = torch.tensor([[4, 0, 2], [5, 1, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    g = t.gather(idx, valid)
    assert g.counts.tolist() == [3, 2]
    assert g.index[0].tolist() == [40, 0, 20] and g.index[1, :2].tolist() == [50, 10]
    for b, n in ((0, 3), (1, 2)):
        src = idx[b, :n]
        torch.testing.assert_close(g.x[b, :n], t.x[b, src], rtol=0, atol=0)
        torch.testing.assert_close(g.size[b, :n], t.size[b, src], rtol=0, atol=0)
        assert g.group[b, :n].tolist() == t.group[b, src].tolist()
        for name in ("cls_attn", "keys"):
            torch.testing.assert_close(g.signals[name][22][b, :n], t.signals[name][22][b, src], rtol=0, atol=0)
    assert g.x[1, 2].abs().sum() == 0 and g.signals["keys"][22][1, 2].abs().sum() == 0
    assert g.budget is t.budget


def test_gather_rejects_padding_and_bad_shapes():
    t = VisualTokens(x=torch.randn(1, 4, 2), mask=torch.tensor([[True, True, False, False]]))
    with pytest.raises(InputError, match="padding"):
        t.gather(torch.tensor([[0, 3]]))
    with pytest.raises(InputError, match="gather index"):
        t.gather(torch.tensor([0, 1]))


def test_keep_mask_keeps_current_order():
    t = _full()
    keep = torch.tensor([[True, False, False, True, True, False], [False] * 5 + [True]])
    k = t.keep_mask(keep)
    assert k.counts.tolist() == [3, 1] and k.num_tokens == 3
    assert k.index[0].tolist() == [0, 30, 40] and k.index[1, 0].item() == 50
    torch.testing.assert_close(k.signals["keys"][22][0], t.signals["keys"][22][0, [0, 3, 4]], rtol=0, atol=0)
    torch.testing.assert_close(k.size[1, :1], t.size[1, [5]], rtol=0, atol=0)
    assert k.budget.tolist() == t.budget.tolist()


def test_keep_mask_ignores_padding():
    t = VisualTokens(x=torch.randn(1, 4, 2), mask=torch.tensor([[True, True, False, False]]))
    assert t.keep_mask(torch.ones(1, 4, dtype=torch.bool)).counts.tolist() == [2]


# ---------------------------------------------------------------------- merging
def test_merge_is_size_weighted_and_follows_signal_rules():
    assert SIGNAL_MERGE_RULES["cls_attn"] == "sum"
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [5.0, -1.0]]], dtype=torch.float64)
    size = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    attn = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    logits = torch.tensor([[1.0, 2.0, 4.0, 8.0]], dtype=torch.float64)
    t = VisualTokens(x=x, size=size, index=torch.tensor([[7, 8, 9, 10]]), group=torch.tensor([[0, 1, 1, 0]]),
                     signals={"cls_attn": {22: attn}, "cls_logits": {23: logits}}, budget=torch.tensor([[3]]))
    # tokens 0, 2 -> slot 1 (rep 2); token 1 -> slot 0 (rep 1); token 3 dropped
    m = t.merge(torch.tensor([[1, 0, 1, -1]]), rep=torch.tensor([[1, 2]]))
    assert m.counts.tolist() == [2]
    assert m.index.tolist() == [[8, 9]] and m.group.tolist() == [[1, 1]]
    assert m.size.tolist() == [[2.0, 4.0]]
    torch.testing.assert_close(m.x[0, 0], x[0, 1], rtol=0, atol=0)
    torch.testing.assert_close(m.x[0, 1], (1 * x[0, 0] + 3 * x[0, 2]) / 4)
    torch.testing.assert_close(m.signals["cls_attn"][22], torch.tensor([[0.2, 0.1 + 0.3]], dtype=torch.float64))
    torch.testing.assert_close(m.signals["cls_logits"][23], torch.tensor([[2.0, (1 * 1.0 + 3 * 4.0) / 4]],
                                                                         dtype=torch.float64))
    assert m.budget.tolist() == [[3]]


def test_merge_with_slot_validity_and_padding():
    t = VisualTokens.from_list([torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)])
    assign = torch.tensor([[0, 0, 1, 1], [0, 0, 5, 5]])  # padding entries of image 1 are ignored
    m = t.merge(assign, rep=torch.tensor([[0, 2], [1, 0]]), slot_valid=torch.tensor([[True, True], [True, False]]))
    assert m.counts.tolist() == [2, 1] and m.size[0].tolist() == [2.0, 2.0] and m.size[1, 0].item() == 2.0
    assert m.index[1, 0].item() == 1
    torch.testing.assert_close(m.x[1, 0], t.x[1, :2].mean(0))
    assert m.x[1, 1].abs().sum() == 0


# ---------------------------------------------------------------------- partitions
def test_split_and_join_groups_round_trip_with_budget():
    B, N = 2, 9
    g = torch.Generator().manual_seed(3)
    group = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2, 2]])
    t = VisualTokens(
        x=torch.randn(B, N, 3, generator=g, dtype=torch.float64),
        mask=torch.tensor([[True] * 9, [True] * 7 + [False] * 2]),
        index=torch.arange(N).repeat(B, 1),
        size=torch.rand(B, N, generator=g, dtype=torch.float64) + 1,
        group=group,
        signals={"cls_attn": {16: torch.rand(B, N, generator=g, dtype=torch.float64)}},
        budget=torch.tensor([[1, 2, 3], [4, 0, 6]]),
        layout=[Layout(grids=((1, 3), (1, 2), (1, 4))), Layout(grids=((1, 1), (1, 5), (1, 3)))],
    )
    rows, G = t.split_groups()
    assert G == 3 and rows.batch_size == 6
    assert rows.counts.tolist() == [3, 2, 4, 1, 5, 1]
    assert rows.budget.tolist() == [[1], [2], [3], [4], [0], [6]]
    assert rows.index[2, :4].tolist() == [5, 6, 7, 8] and rows.index[5, :1].tolist() == [6]
    assert rows.layout[0] == t.layout[0] and rows.layout[5] == t.layout[1]
    for r in range(6):
        b, p = divmod(r, 3)
        assert bool((rows.group[r, : rows.counts[r]] == p).all())
        src = (group[b] == p) & t.valid[b]
        torch.testing.assert_close(rows.x[r, : rows.counts[r]], t.x[b, src], rtol=0, atol=0)
        torch.testing.assert_close(rows.signals["cls_attn"][16][r, : rows.counts[r]],
                                   t.signals["cls_attn"][16][b, src], rtol=0, atol=0)
    back = t.join_groups(rows, G)
    for b in range(B):
        _assert_rows_equal(_row(back, b), _row(t, b))  # t's tokens were already grouped in order
    assert back.budget.tolist() == t.budget.tolist() and back.layout == t.layout


def test_split_groups_reorders_interleaved_partitions_stably():
    t = VisualTokens(x=torch.randn(1, 5, 2), group=torch.tensor([[1, 0, 1, 0, 0]]), budget=torch.tensor([[1, 1]]))
    rows, G = t.split_groups()
    assert rows.index[0, :3].tolist() == [1, 3, 4] and rows.index[1, :2].tolist() == [0, 2]
    assert t.join_groups(rows, G).index.tolist() == [[1, 3, 4, 0, 2]]


def test_split_groups_rejects_groups_beyond_the_budget():
    t = VisualTokens(x=torch.randn(1, 3, 2), group=torch.tensor([[0, 1, 2]]), budget=torch.tensor([[1, 1]]))
    with pytest.raises(LayoutError):
        t.split_groups()


def test_num_groups_sources():
    assert VisualTokens(x=torch.randn(1, 3, 2), group=torch.tensor([[0, 3, 1]])).num_groups == 4
    assert VisualTokens(x=torch.randn(1, 3, 2), budget=torch.tensor([[1, 1]])).num_groups == 2
    assert VisualTokens(x=torch.randn(1, 3, 2), layout=Layout(grids=((1, 1),) * 3)).num_groups == 3


# ---------------------------------------------------------------------- conversions
def test_from_list_unbind_to_padded():
    a, b = torch.randn(3, 2), torch.randn(5, 2)
    t = VisualTokens.from_list([a, b], index=[torch.tensor([2, 4, 6]), torch.arange(5)],
                               size=[torch.ones(3) * 2, torch.ones(5)],
                               group=[torch.tensor([0, 0, 1]), torch.zeros(5, dtype=torch.long)],
                               signals={"cls_attn": {22: [torch.ones(3), torch.ones(5) * 2]}},
                               budget=torch.tensor([[1, 1], [2, 2]]))
    assert t.counts.tolist() == [3, 5] and t.mask[0].tolist() == [True] * 3 + [False] * 2
    xs = t.unbind()
    torch.testing.assert_close(xs[0], a, rtol=0, atol=0)
    torch.testing.assert_close(xs[1], b, rtol=0, atol=0)
    assert [i.tolist() for i in t.unbind_index()] == [[2, 4, 6], [0, 1, 2, 3, 4]]
    assert t.size[0, :3].tolist() == [2.0] * 3 and t.group[0, :3].tolist() == [0, 0, 1]
    assert t.signals["cls_attn"][22][1].tolist() == [2.0] * 5 and t.budget.tolist() == [[1, 1], [2, 2]]
    x, valid = t.to_padded()
    assert x.shape == (2, 5, 2) and valid.tolist() == t.mask.tolist() and x[0, 3:].abs().sum() == 0
    with pytest.raises(InputError):
        VisualTokens.from_list([])
    assert VisualTokens.from_list([a, a.clone()]).mask is None


def test_to_moves_and_casts_float_fields_only():
    t = _full().to(torch.float32)
    assert t.x.dtype == torch.float32 and t.size.dtype == torch.float32
    assert t.signals["keys"][22].dtype == torch.float32
    assert t.index.dtype == torch.long and t.group.dtype == torch.long and t.budget.dtype == torch.long


# ---------------------------------------------------------------------- checks
def test_check_finite_reports_valid_tokens_only():
    x = torch.randn(2, 3, 2)
    x[1, 2, 0] = float("nan")
    with pytest.raises(InputError, match="image 1, token 2"):
        VisualTokens(x=x).check_finite("operator 'x'")
    VisualTokens(x=x, mask=torch.tensor([[True] * 3, [True, True, False]])).check_finite()
    x[0, 0, 1] = float("inf")
    with pytest.raises(InputError, match="NaN/Inf"):
        VisualTokens(x=x).check_finite()


def test_missing_signal_names_op_signal_and_layer():
    t = VisualTokens(x=torch.randn(1, 3, 2), signals={"cls_attn": {22: torch.rand(1, 3)}})
    assert t.signal("cls_attn", 22) is t.signals["cls_attn"][22]
    with pytest.raises(SignalError) as e:
        t.signal("cls_attn", 16, op="operator 'vtc-cls'")
    msg = str(e.value)
    assert "'vtc-cls'" in msg and "'cls_attn'" in msg and "16" in msg and "[22]" in msg


# ---------------------------------------------------------------------- grid geometry
def test_grid_position_single_grid():
    t = VisualTokens(x=torch.randn(1, 3, 2), index=torch.tensor([[0, 7, 11]]), layout=Layout.grid(3, 4))
    r, c, h, w = t.grid_position()
    assert r.tolist() == [[0, 1, 2]] and c.tolist() == [[0, 3, 3]]
    assert h.tolist() == [[3] * 3] and w.tolist() == [[4] * 3]


def test_grid_position_without_layout_assumes_a_square():
    r, c, h, _ = VisualTokens(x=torch.randn(1, 3, 2), index=torch.tensor([[0, 5, 15]])).grid_position()
    assert h.tolist() == [[4] * 3] and r.tolist() == [[0, 1, 3]] and c.tolist() == [[0, 1, 3]]
    with pytest.raises(LayoutError, match="square"):
        VisualTokens(x=torch.randn(1, 5, 2)).grid_position()


def test_grid_position_anyres_partitions():
    lay = Layout.for_anyres((2, 3), (1, 2))  # 3 partitions of 2x3, offsets 0, 6, 12
    t = VisualTokens(x=torch.randn(2, 3, 2), index=torch.tensor([[4, 6, 17], [0, 11, 12]]),
                     group=torch.tensor([[0, 1, 2], [0, 1, 2]]), layout=lay)
    r, c, h, w = t.grid_position()
    assert r.tolist() == [[1, 0, 1], [0, 1, 0]] and c.tolist() == [[1, 0, 2], [0, 2, 0]]
    bad = VisualTokens(x=torch.randn(1, 1, 2), index=torch.tensor([[6]]), group=torch.tensor([[0]]), layout=lay)
    with pytest.raises(LayoutError, match="outside"):
        bad.grid_position()


def test_size_is_kept_in_float32_for_half_features():
    t = VisualTokens(x=torch.randn(1, 3, 2).bfloat16(), size=torch.tensor([[1, 2, 289]]))
    assert t.size.dtype == torch.float32 and t.size.tolist() == [[1.0, 2.0, 289.0]]
    assert VisualTokens(x=torch.randn(1, 3, 2).half()).sizes.dtype == torch.float32
    assert VisualTokens(x=torch.randn(1, 3, 2, dtype=torch.float64)).sizes.dtype == torch.float64
    m = t.merge(torch.tensor([[0, 0, 0]]), torch.tensor([[0]]))
    assert m.size.tolist() == [[292.0]] and m.x.dtype == torch.bfloat16


def test_validate_checks_features_signals_and_sizes_once():
    from vtc.ops.opcount import count_ops

    t = _full()
    _, c = count_ops(t.validate, "op")
    assert c.syncs == 1 and c.names["aminmax"] == 4  # x, two signals, size
    _, c = count_ops(t.validate, "op", {"cls_attn": [22]})
    assert c.names["aminmax"] == 3
    bad = t.replace(size=t.size.index_fill(1, torch.tensor([4]), -2.0))
    with pytest.raises(InputError, match="size .* -2.0 at image 0, token 4"):
        bad.validate("op")


def test_replace_checks_only_what_changed():
    t = _full()
    with pytest.raises(InputError, match="index"):
        t.replace(index=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(InputError, match="negative"):
        t.replace(budget=torch.tensor([[1, -1], [0, 0]]))
    with pytest.raises(InputError, match="no field"):
        t.replace(sizes=None)
    packed = t.replace(mask=torch.tensor([[False, True, True, True, True, True], [True] * 6]))
    assert packed.mask[0].tolist() == [True] * 5 + [False] and packed.index[0, 0].item() == 10
    assert t.replace(budget=None).index is t.index


def test_raster_flag_follows_the_default_index():
    t = VisualTokens(x=torch.randn(2, 4, 3))
    assert t.raster and t.replace(budget=None).raster
    assert not t.gather(torch.tensor([[1, 0], [0, 1]])).raster
    assert not VisualTokens(x=torch.randn(2, 4, 3), index=torch.arange(4).expand(2, 4)).raster
