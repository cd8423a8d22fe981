"""HiRED (vtc/ops/hired.py) against a brute-force reference written from methods.md §3 and §0.

The reference below uses plain Python loops and lists (no vtc code): budgets, raster-chunk vs
geometric crop regions, float32-floored vs largest-remainder crop budgets, per-crop top-k,
LLaVA-NeXT unpadding and the emitted index order. Official mode assembles the crops as the HiRED
fork's transformers does: the nH x nW crops tiled on an nW x nH grid, unpadded in float32.
"""

from fractions import Fraction

import numpy as np
import pytest
import torch
from _ops_testlib import CLIP_L

import vtc
from vtc import Layout, VisualTokens
from vtc.errors import BudgetError, ConfigError, InputError, LayoutError, SignalError

# (nH, nW, patch side, original (height, width)): unpadding removes columns, rows, rows, columns,
# rows, nothing, rows; 3x1 on 8x8 has 64 thumbnail tokens for 3 chunks (the official reshape fails);
# 287x328 on 1x2 crops: the official (transposed, 16x8) grid keeps rows 5..10 in float32, 4..11 in
# transformers' arithmetic
CASES = [
    (3, 1, 8, (200, 50)),
    (2, 2, 8, (100, 160)),
    (1, 2, 8, (60, 160)),
    (2, 1, 8, (200, 70)),
    (1, 3, 6, (40, 180)),
    (2, 2, 8, (80, 80)),
    (2, 2, 24, (300, 500)),
    (1, 2, 8, (287, 328)),
]


# ---------------------------------------------------------------------- brute-force reference
def ref_unpad(H, W, oh, ow, float32=False):
    """Rows [r0, r1) and columns [c0, c1) of the (H, W) crop grid kept by LLaVA-NeXT's unpad;
    ``float32``: as the HiRED fork computes it, with the image size as a LongTensor row."""
    if float32:
        oh, ow = torch.tensor(oh), torch.tensor(ow)
    if ow / oh > W / H:
        pad = (H - int(oh * (W / ow) if float32 else oh * W / ow)) // 2
        return pad, H - pad, 0, W
    pad = (W - int(ow * (H / oh) if float32 else ow * H / oh)) // 2
    return 0, H, pad, W - pad


def ref_topk(scores, k, allowed=None):
    cand = [t for t in range(len(scores)) if allowed is None or allowed[t]]
    return sorted(cand, key=lambda t: (-scores[t], t))[:k]


def ref_apportion(w, total, cap):
    C = len(w)
    out, left = [0] * C, min(total, sum(cap))
    while left > 0:
        open_ = [c for c in range(C) if out[c] < cap[c]]
        if not open_:
            break
        ww = {c: w[c] for c in open_}
        if sum(ww.values()) == 0:
            ww = {c: 1 for c in open_}
        W = sum(ww.values())
        give = {c: ww[c] * left // W for c in open_}
        rest = left - sum(give.values())
        for c in sorted(open_, key=lambda c: (-(ww[c] * left % W), c))[:rest]:
            give[c] += 1
        for c in open_:
            g = min(give[c], cap[c] - out[c])
            out[c] += g
            left -= g
    return out


def ref_hired(c0, c22, nh, nw, side, image_size, *, rate=0.2, alpha=0.5, keep=None, spatial_k=None,
              compat="official"):
    """(emitted indices, allocated budgets) for one image; c0/c22 are lists of per-partition score lists."""
    official = compat == "official"
    N, C = side * side, nh * nw
    P = 1 + C
    TW = nh if official else nw  # official: the crops (row-major) tiled nW rows x nH columns
    H, W = C // TW * side, TW * side
    r0, r1, q0, q1 = ref_unpad(H, W, *image_size, float32=official)

    def cell(c, t):
        a, b = divmod(c, TW)
        i, j = divmod(t, side)
        gr, gc = a * side + i, b * side + j
        return (r0 <= gr < r1 and q0 <= gc < q1), gr * W + gc

    cap = [sum(cell(c, t)[0] for t in range(N)) for c in range(C)]
    b_tot = keep if keep is not None else int(P * N * rate)
    b_full = min(int(b_tot * alpha), N)
    if official:
        b_sub = min(b_tot - b_full, (P - 1) * N)
        k_sp = int(N * (1 - alpha)) if spatial_k is None else spatial_k
    else:
        b_sub = min(b_tot - b_full, sum(cap))
        k_sp = N // 2 if spatial_k is None else spatial_k
    crop_b = [0] * C
    if b_sub > 0:
        cnt = [0] * C
        for t in ref_topk(c0[0], k_sp):
            i, j = divmod(t, side)
            if official:  # m.reshape(nH, nW, N // C): contiguous raster chunks (vtc: t*C//N when
                region = t // (N // C) if N % C == 0 else t * C // N  # C does not divide N)
            else:  # centre of the thumbnail cell on the unpadded crop grid
                y = r0 + Fraction(2 * i + 1, 2 * side) * (r1 - r0)
                x = q0 + Fraction(2 * j + 1, 2 * side) * (q1 - q0)
                region = min(int(y // side), nh - 1) * nw + min(int(x // side), nw - 1)
            cnt[region] += 1
        total = sum(cnt)
        if official:
            if total == 0:
                crop_b = [b_sub // C] * C
            else:
                crop_b = [min(int(np.float32(n) / np.float32(total) * np.float32(b_sub)), N) for n in cnt]
        else:
            crop_b = ref_apportion(cnt, b_sub, cap)
    out = [t for t in sorted(ref_topk(c22[0], b_full))]
    cells = []
    for c in range(C):
        allowed = None if official else [cell(c, t)[0] for t in range(N)]
        for t in ref_topk(c22[c + 1], crop_b[c], allowed):
            ok, gpos = cell(c, t)
            if ok:
                cells.append((gpos, (c + 1) * N + t))
    out += [idx for _, idx in sorted(cells)]
    return out, [b_full] + [min(b, k) for b, k in zip(crop_b, cap)]


# ---------------------------------------------------------------------- synthetic inputs
def make_tokens(nh, nw, side, image_size, seed=0, layers=(0, 22), dim=6):
    P, N = 1 + nh * nw, side * side
    g = torch.Generator().manual_seed(seed)
    sig = {l: torch.rand(1, P * N, generator=g, dtype=torch.float64) for l in layers}
    x = torch.randn(1, P * N, dim, generator=g, dtype=torch.float64)
    tok = VisualTokens(x=x, group=(torch.arange(P * N) // N).unsqueeze(0),
                       layout=Layout.for_anyres(side, (nh, nw), image_size=image_size), signals={"cls_attn": sig},
                       layer_space=CLIP_L)
    return tok


def per_part(tok, layer, P, N):
    s = tok.signals["cls_attn"][layer][0].tolist()
    return [s[p * N:(p + 1) * N] for p in range(P)]


def counts_per_group(out, P):
    return torch.bincount(out.group[0, : out.counts[0]], minlength=P).tolist()


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("compat", ["official", "clean"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}px-{c[3][0]}x{c[3][1]}")
def test_indices_and_budgets_match_reference(case, compat):
    nh, nw, side, size = case
    P, N = 1 + nh * nw, side * side
    tok = make_tokens(nh, nw, side, size, seed=side + nh * 10 + nw)
    args = [dict()] if side == 24 else [dict(), dict(rate=0.45, alpha=0.3), dict(keep=7, alpha=0.25)]
    for kw in args:
        spec = {"op": "hired", "compat": compat, **({"keep": kw["keep"]} if "keep" in kw else {}),
                **({"ratio": kw["rate"]} if "rate" in kw else {}), **({"alpha": kw["alpha"]} if "alpha" in kw else {})}
        op = vtc.build(spec)[0]
        want, want_budget = ref_hired(per_part(tok, 0, P, N), per_part(tok, 22, P, N), nh, nw, side, size,
                                      compat=compat, **kw)
        out = op(tok)
        assert out.index[0, : out.counts[0]].tolist() == want, kw
        assert out.budget is None
        alloc = op.allocate(tok)
        assert alloc.budget[0].tolist() == want_budget, kw
        if compat == "official":
            assert out.counts[0] <= (kw.get("keep") or int(P * N * kw.get("rate", 0.2)))


def test_default_24x24_budget_worked_example():
    # methods.md §3: 2x2 grid, P=5: B_tot=576, B_full=288, B_sub=288 split by the top 288 layer-0 tokens
    tok = make_tokens(2, 2, 24, (336, 336), seed=3)
    b = vtc.create("hired").allocate(tok).budget[0].tolist()
    assert b[0] == 288 and sum(b[1:]) <= 288 and sum(b[1:]) >= 288 - 3
    bc = vtc.create("hired", compat="clean").allocate(tok).budget[0].tolist()
    assert bc[0] == 288 and sum(bc[1:]) == 288
    # no unpadding here: official keeps exactly its floored budgets, clean exactly B_tot
    assert vtc.create("hired")(tok).counts.item() == sum(b)
    assert vtc.create("hired", compat="clean")(tok).counts.item() == 576


def test_official_raster_chunks_vs_clean_geometric_regions():
    """Layer-0 attention on the thumbnail's left half: the official bands see every crop equally;
    the geometric mapping gives the whole crop budget to the left crops."""
    side, N = 8, 64
    tok = make_tokens(2, 2, side, (80, 80))
    left = torch.tensor([1.0 if t % side < side // 2 else 0.0 for t in range(N)], dtype=torch.float64)
    a0 = tok.signals["cls_attn"][0].clone()
    a0[0, :N] = left + torch.linspace(0, 1e-3, N, dtype=torch.float64)  # strict order, left half on top
    tok = tok.replace(signals={"cls_attn": {0: a0, 22: tok.signals["cls_attn"][22]}})
    off = vtc.create("hired", ratio=0.5).allocate(tok).budget[0].tolist()
    clean = vtc.create("hired", ratio=0.5, compat="clean").allocate(tok).budget[0].tolist()
    assert off == [64, 24, 24, 24, 24]      # B_tot=160, B_full=64, B_sub=96: 8 marked per band
    assert clean == [64, 48, 0, 48, 0]      # crops (0,0) and (1,0) hold the left half


def test_official_loses_padding_picks_clean_does_not():
    tok = make_tokens(2, 2, 8, (100, 160))  # rows 0-2 and 13-15 of the 16-row grid are padding
    c22 = tok.signals["cls_attn"][22].clone()
    pad_rows = torch.zeros(5, 64, dtype=torch.float64)
    pad_rows[1:3, :3 * 8] = 10.0  # crops (0,0), (0,1): their first 3 rows (padding) score highest
    c22[0] += pad_rows.flatten()
    tok = tok.replace(signals={"cls_attn": {0: tok.signals["cls_attn"][0], 22: c22}})
    b = vtc.create("hired", ratio=0.5).allocate(tok).budget[0].tolist()
    off = vtc.create("hired", ratio=0.5)(tok)
    clean = vtc.create("hired", ratio=0.5, compat="clean")(tok)
    got = counts_per_group(off, 5)
    assert got[1] == max(b[1] - 24, 0) and got[2] == max(b[2] - 24, 0)
    assert counts_per_group(clean, 5)[1:] == vtc.create("hired", ratio=0.5, compat="clean").allocate(tok).budget[0, 1:].tolist()


# ---------------------------------------------------------------------- single partition
def test_single_image_llava15_variant():
    g = torch.Generator().manual_seed(1)
    a = {l: torch.rand(2, 576, generator=g, dtype=torch.float64) for l in (0, 22)}
    tok = VisualTokens(x=torch.randn(2, 576, 4, generator=g), signals={"cls_attn": a}, layer_space=CLIP_L)
    out = vtc.create("hired")(tok)  # ratio 0.2 -> int(576*0.2) = 115, raster order
    assert out.counts.tolist() == [115, 115]
    for b in range(2):
        assert out.index[b].tolist() == sorted(ref_topk(a[22][b].tolist(), 115))
    assert vtc.create("hired").allocate(tok).budget.tolist() == [[115], [115]]
    assert vtc.create("hired", keep=1000)(tok).counts.tolist() == [576, 576]
    assert vtc.create("hired", keep=3)(tok).index[0].tolist() == sorted(ref_topk(a[22][0].tolist(), 3))


# ---------------------------------------------------------------------- layers read
def test_requires_names_exactly_the_layers_read():
    assert vtc.create("hired").requires == {"cls_attn": [0, "feature"]}
    assert CLIP_L.resolve_all(vtc.create("hired").requires["cls_attn"]) == [0, 22]  # official, on CLIP-L
    assert vtc.create("hired", top_layer=3, bottom_layer=2).requires == {"cls_attn": [2, 3]}
    assert vtc.build("hired:ratio=0.2 | divprune").requires == {"cls_attn": [0, "feature"]}


def test_one_hot_layer_markers():
    """methods.md §8.3: layer l's CLS attention marks token l; only layer 22 may decide the picks
    and only layer 0 the crop budgets."""
    layers = range(24)
    one_hot = {l: torch.zeros(1, 576, dtype=torch.float64).index_fill_(1, torch.tensor([l]), 1.0) for l in layers}
    tok = VisualTokens(x=torch.randn(1, 576, 4), signals={"cls_attn": one_hot}, layer_space=CLIP_L)
    assert vtc.create("hired", keep=1)(tok).index.tolist() == [[22]]
    # AnyRes 2x2 of 8x8: layer l's thumbnail attention covers band (l % 4) of the thumbnail, so
    # the crop budgets show which layer was read; crops' attention is one-hot at token l
    side, N, P = 8, 64, 5
    sig = {}
    for l in layers:
        s = torch.zeros(P, N, dtype=torch.float64)
        band = 3 if l == 0 else l % 3
        s[0, band * 16:(band + 1) * 16] = 1.0
        s[1:, l % N] = 2.0
        sig[l] = s.view(1, -1)
    tok = VisualTokens(x=torch.randn(1, P * N, 4), layout=Layout.for_anyres(side, (2, 2), image_size=(80, 80)),
                       signals={"cls_attn": sig}, layer_space=CLIP_L)
    op = vtc.create("hired", ratio=0.25, spatial_k=16)  # B_tot=80: 40 thumbnail, 40 crops
    assert op.allocate(tok).budget[0].tolist() == [40, 0, 0, 0, 40]
    out = vtc.create("hired", keep=65, spatial_k=16, alpha=1.0)(tok)  # whole thumbnail, 1 crop token
    assert [i for i in out.index[0].tolist() if i >= N] == [4 * N + 22]  # crop 4 keeps its token 22 first
    assert vtc.create("hired", ratio=0.25, spatial_k=16, top_layer=5).allocate(tok).budget[0].tolist() == [40, 0, 0, 40, 0]


# ---------------------------------------------------------------------- guards
@pytest.mark.parametrize("compat", ["official", "clean"])
def test_alpha_one_does_not_divide_by_zero(compat):
    tok = make_tokens(2, 2, 8, (100, 160))
    P, N = 5, 64
    op = vtc.create("hired", ratio=0.5, alpha=1.0, compat=compat)  # B_tot=160, B_full=64, B_sub=96, k=0
    b = op.allocate(tok).budget[0].tolist()
    want, want_b = ref_hired(per_part(tok, 0, P, N), per_part(tok, 22, P, N), 2, 2, 8, (100, 160),
                             rate=0.5, alpha=1.0, compat=compat)
    assert b == want_b and b[0] == 64
    assert (b[1:] == [24, 24, 24, 24]) if compat == "official" else (sum(b[1:]) == 96)
    assert op(tok).index[0].tolist() == want


@pytest.mark.parametrize("compat", ["official", "clean"])
def test_budget_below_partition_count(compat):
    tok = make_tokens(2, 2, 8, (80, 80))
    for keep in (1, 2, 3, 4):
        op = vtc.create("hired", keep=keep, compat=compat)
        b = op.allocate(tok).budget[0]
        assert int(b.sum()) <= keep and int((b == 0).sum()) >= 1
        out = op(tok)
        assert counts_per_group(out, 5) == b.tolist()  # no unpadding here: budgets are exact


def test_an_image_is_never_emptied():
    """keep=1: B_full = int(0.5) = 0 and B_sub = 1 floors to 0 in every crop whose chunk holds a
    share < 1 of the spatial tokens; the official code then returns no token, vtc keeps the
    thumbnail's top one."""
    tok = make_tokens(2, 2, 8, (80, 80), seed=9)
    op = vtc.create("hired", keep=1)
    assert op.allocate(tok).budget[0].tolist() == [1, 0, 0, 0, 0]
    top = max(range(64), key=lambda t: tok.signals["cls_attn"][22][0, t].item())
    assert op(tok).index.tolist() == [[top]]
    single = VisualTokens(x=torch.randn(1, 4, 2), signals={"cls_attn": {22: torch.tensor([[0.1, 0.5, 0.2, 0.2]])}},
                          layer_space=CLIP_L)
    assert vtc.create("hired")(single).index.tolist() == [[1]]  # int(4*0.2) = 0 -> 1


def test_errors_say_what_to_do():
    tok = make_tokens(2, 2, 8, (100, 160))
    no_size = tok.replace(layout=Layout.for_anyres(8, (2, 2)))
    with pytest.raises(LayoutError, match="image_size"):
        vtc.create("hired")(no_size)
    with pytest.raises(LayoutError, match="for_anyres"):
        vtc.create("hired")(tok.replace(layout=None))
    with pytest.raises(SignalError, match="vision layer 0"):
        vtc.create("hired")(tok.replace(signals={"cls_attn": {22: tok.signals["cls_attn"][22]}}))
    # the crops' padding tokens already removed: clean works, official cannot reproduce them
    no_pad = vtc.create("hired", compat="clean").allocate(tok).replace(budget=None)
    assert vtc.create("hired", compat="clean")(no_pad).index.tolist() == vtc.create("hired", compat="clean")(tok).index.tolist()
    with pytest.raises(LayoutError, match="compat='clean'"):
        vtc.create("hired")(no_pad)
    # an incomplete thumbnail (another operator ran first)
    with pytest.raises(LayoutError, match="first in the pipeline"):
        vtc.create("hired")(tok.keep_mask(tok.index >= 1))
    with pytest.raises(ConfigError, match="keep= or ratio="):
        vtc.create("hired", ratio=0.2, keep=10)
    with pytest.raises(BudgetError, match="not both"):
        vtc.ops.hired.HiredConfig(ratio=0.2, keep=10)
    with pytest.raises(ConfigError):
        vtc.create("hired", alpha=1.5)
    with pytest.raises(ConfigError):
        vtc.build("hired:compat=paper")


def test_nan_signal_and_config_round_trip():
    tok = make_tokens(2, 2, 8, (80, 80))
    bad = tok.signals["cls_attn"][0].clone()
    bad[0, 5] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        vtc.create("hired")(tok.replace(signals={"cls_attn": {0: bad, 22: tok.signals["cls_attn"][22]}}))
    pipe = vtc.build("hired:ratio=0.3,alpha=0.4,compat=clean | divprune")
    assert vtc.build(pipe.spec()) == pipe == vtc.build(str(pipe))
    assert str(vtc.build("hired")) == "hired"


def test_newline_policy():
    assert vtc.create("hired").newline_policy == "none"
    assert vtc.create("hired", compat="clean").newline_policy == "rows"


# ---------------------------------------------------------------------- batches and pipelines
def test_batch_of_different_grids_equals_one_by_one():
    a = make_tokens(2, 2, 8, (100, 160), seed=1)
    b = make_tokens(1, 3, 8, (40, 180), seed=2)
    batch = VisualTokens.from_list([a.x[0], b.x[0]], index=[a.index[0], b.index[0]], group=[a.group[0], b.group[0]],
                                   layout=[a.layout, b.layout],
                                   signals={"cls_attn": {l: [a.signals["cls_attn"][l][0], b.signals["cls_attn"][l][0]]
                                                         for l in (0, 22)}}, layer_space=CLIP_L)
    for compat in ("official", "clean"):
        op = vtc.create("hired", ratio=0.3, compat=compat)
        out = op(batch)
        for i, one in enumerate((a, b)):
            assert out.unbind_index()[i].tolist() == op(one).index[0].tolist()
            assert torch.equal(out.unbind()[i], op(one).x[0])
        alloc = op.allocate(batch).budget
        assert alloc[0].tolist() == op.allocate(a).budget[0].tolist()
        assert alloc[1].tolist() == op.allocate(b).budget[0].tolist() + [0]  # 1x3 has 4 partitions of 5
        filled = vtc.build(f"hired:ratio=0.3,compat={compat} | random")(batch)
        for i in range(2):
            got = torch.bincount(filled.group[i, : filled.counts[i]], minlength=5)
            assert got.tolist() == alloc[i].tolist()


SELECTORS = ["divprune", "vtc-cls:layers=[22]", "random", "uniform", "tome", "pool"]


@pytest.mark.parametrize("compat", ["official", "clean"])
@pytest.mark.parametrize("selector", SELECTORS)
def test_selectors_fill_hired_budgets(selector, compat):
    tok = make_tokens(2, 2, 8, (100, 160), seed=5)
    for spec in (f"hired:ratio=0.3,compat={compat}", f"hired:keep=3,compat={compat}"):
        pipe = vtc.build(f"{spec} | {selector}")
        budget = pipe[0].allocate(tok).budget[0].tolist()
        got = counts_per_group(pipe(tok), 5)
        if selector == "pool":  # pools each partition to a grid of at most its budget
            assert all(g <= b for g, b in zip(got, budget)) and all((g > 0) == (b > 0) for g, b in zip(got, budget))
            gh = max(int(budget[0] ** 0.5), 1)
            assert got[0] == gh * min(8, budget[0] // gh)
        else:
            assert got == budget, spec
        # a budget is never spent on padding: nothing the unpad removes is kept
        r0, r1, _, _ = ref_unpad(16, 16, 100, 160)
        out = pipe(tok)
        for i in out.index[0, : out.counts[0]].tolist():
            p, t = divmod(i, 64)
            if p:
                assert r0 <= ((p - 1) // 2) * 8 + t // 8 < r1
