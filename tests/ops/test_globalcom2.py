"""GlobalCom² (vtc/ops/globalcom2.py) against a brute-force reference written from methods.md §4 and §0.

The reference uses plain Python loops (no vtc code): descending-score thumbnail, region sums of
thumbnail logits, softmax/T crop scales, bilinear upsampling with ``align_corners=False`` over the
unpadded crop grid, L2-normalised local + global scores, ``int(N_valid * scale)`` per crop and the
emitted index order (official: each kept crop token placed at the cell numbered by its rank among its
crop's unpadded tokens, the unpad in original LLaVA's float64 arithmetic).
"""

import math
from fractions import Fraction

import pytest
import torch
from _ops_testlib import CLIP_L

import vtc
from vtc import Layout, VisualTokens
from vtc.errors import ConfigError, LayoutError, SignalError

# (nH, nW, patch side, original (height, width)): unpadding removes rows, rows, columns, rows,
# nothing, rows, columns of side-by-side crops (the official rank placement reflows their rows),
# columns where the roundings differ;
# 3x1 on 8 rows makes the official tiles (rows 0-1, 2-3, 4-7) uneven
CASES = [
    (3, 1, 8, (200, 50)),
    (2, 2, 8, (100, 160)),
    (1, 2, 8, (60, 160)),
    (2, 1, 8, (200, 70)),
    (1, 3, 6, (40, 180)),
    (2, 2, 8, (80, 80)),
    (2, 2, 24, (300, 500)),
    (2, 2, 8, (160, 100)),
    (1, 2, 8, (392, 343)),  # original LLaVA's float64 keeps columns 5..10, transformers' 4..11
]


# ---------------------------------------------------------------------- brute-force reference
def ref_unpad(H, W, oh, ow, llava=False):
    """Rows [r0, r1) and columns [c0, c1) of the (H, W) crop grid kept by LLaVA-NeXT's unpad
    (``llava``: original LLaVA's ``int(orig_h * scale)`` with ``scale = W / orig_w``)."""
    if ow / oh > W / H:
        pad = (H - int(oh * (W / ow) if llava else oh * W / ow)) // 2
        return pad, H - pad, 0, W
    pad = (W - int(ow * (H / oh) if llava else ow * H / oh)) // 2
    return 0, H, pad, W - pad


def ref_bilinear(img, h, w, Ho, Wo):
    """``img`` (h x w list of lists) resized to Ho x Wo, bilinear, align_corners=False."""
    def src(d, n_in, n_out):
        s = max(n_in / n_out * (d + 0.5) - 0.5, 0.0)
        i0 = int(s)
        return i0, min(i0 + 1, n_in - 1), s - i0

    out = [[0.0] * Wo for _ in range(Ho)]
    for y in range(Ho):
        y0, y1, ly = src(y, h, Ho)
        for x in range(Wo):
            x0, x1, lx = src(x, w, Wo)
            out[y][x] = ((1 - ly) * ((1 - lx) * img[y0][x0] + lx * img[y0][x1])
                         + ly * ((1 - lx) * img[y1][x0] + lx * img[y1][x1]))
    return out


def ref_globalcom2(s, nh, nw, side, image_size, *, rho=0.25, T=10.0, compat="official"):
    """(emitted indices, budgets) for one image; ``s`` is a list of per-partition logit lists."""
    official = compat == "official"
    N, C = side * side, nh * nw
    H, W = nh * side, nw * side
    r0, r1, q0, q1 = ref_unpad(H, W, *image_size, llava=official)
    k0 = int(N * rho)
    thumb = sorted(range(N), key=lambda t: (-s[0][t], t))[:k0]
    if not official:
        thumb = sorted(thumb)
    S = [0.0] * C
    for t in range(N):
        i, j = divmod(t, side)
        if official:
            ph, pw = max(side // nh, 1), max(side // nw, 1)
            a, b = min(i // ph, nh - 1), min(j // pw, nw - 1)
        else:
            y = r0 + Fraction(2 * i + 1, 2 * side) * (r1 - r0)
            x = q0 + Fraction(2 * j + 1, 2 * side) * (q1 - q0)
            a, b = min(int(y // side), nh - 1), min(int(x // side), nw - 1)
        S[a * nw + b] += s[0][t]
    e = [math.exp((v - max(S)) / T) for v in S]
    p = [v / sum(e) for v in e]
    scale = [min(rho * (1 + pr - sum(p) / C), 1.0) for pr in p]
    G = ref_bilinear([s[0][i * side:(i + 1) * side] for i in range(side)], side, side, r1 - r0, q1 - q0)
    budgets, cells = [k0], []
    for c in range(C):
        a, b = divmod(c, nw)
        members = []
        for t in range(N):
            gr, gc = a * side + t // side, b * side + t % side
            if r0 <= gr < r1 and q0 <= gc < q1:
                members.append((t, gr, gc))
        loc = [s[c + 1][t] for t, _, _ in members]
        glob = [G[gr - r0][gc - q0] for _, gr, gc in members]
        nl, ng = math.sqrt(sum(v * v for v in loc)), math.sqrt(sum(v * v for v in glob))
        score = [l / nl + g / ng for l, g in zip(loc, glob)]
        k = int(len(members) * scale[c])
        budgets.append(k)
        for m in sorted(range(len(members)), key=lambda m: (-score[m], members[m][0]))[:k]:
            t, gr, gc = members[m]
            if official:  # written into cell m (its number among the crop's unpadded tokens) of the crop
                gr, gc = a * side + m // side, b * side + m % side
            cells.append((gr * W + gc, (c + 1) * N + t))
    return thumb + [i for _, i in sorted(cells)], budgets


# ---------------------------------------------------------------------- synthetic inputs
def make_tokens(nh, nw, side, image_size, seed=0, layers=(23,), dim=6):
    P, N = 1 + nh * nw, side * side
    g = torch.Generator().manual_seed(seed)
    logits = {l: 3 * torch.randn(1, P * N, generator=g, dtype=torch.float64) for l in layers}
    x = torch.randn(1, P * N, dim, generator=g, dtype=torch.float64)
    return VisualTokens(x=x, group=(torch.arange(P * N) // N).unsqueeze(0),
                        layout=Layout.for_anyres(side, (nh, nw), image_size=image_size),
                        signals={"cls_logits": logits}, layer_space=CLIP_L)


def per_part(tok, P, N, layer=23):
    s = tok.signals["cls_logits"][layer][0].tolist()
    return [s[p * N:(p + 1) * N] for p in range(P)]


def counts_per_group(out, P, b=0):
    return torch.bincount(out.group[b, : out.counts[b]], minlength=P).tolist()


# ---------------------------------------------------------------------- exactness
def test_reference_bilinear_is_torchs():
    img = torch.randn(5, 7, dtype=torch.float64)
    want = torch.nn.functional.interpolate(img.view(1, 1, 5, 7), size=(11, 9), mode="bilinear", align_corners=False)
    assert torch.allclose(torch.tensor(ref_bilinear(img.tolist(), 5, 7, 11, 9), dtype=torch.float64), want.view(11, 9))


@pytest.mark.parametrize("compat", ["official", "clean"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}px-{c[3][0]}x{c[3][1]}")
def test_indices_and_budgets_match_reference(case, compat):
    nh, nw, side, size = case
    P, N = 1 + nh * nw, side * side
    tok = make_tokens(nh, nw, side, size, seed=side + nh * 10 + nw)
    for kw in ([dict()] if side == 24 else [dict(), dict(rho=0.6, T=2.0)]):
        op = vtc.create("globalcom2", compat=compat, ratio=kw.get("rho", 0.25), temperature=kw.get("T", 10.0))
        want, want_budget = ref_globalcom2(per_part(tok, P, N), nh, nw, side, size, compat=compat, **kw)
        out = op(tok)
        assert out.index[0, : out.counts[0]].tolist() == want, kw
        assert counts_per_group(out, P) == want_budget
        alloc = op.allocate(tok)
        assert alloc.budget[0].tolist() == want_budget
        assert out.counts[0] == sum(want_budget)


def test_official_thumbnail_is_in_descending_score_order():
    tok = make_tokens(2, 2, 8, (80, 80), seed=4)
    s0 = tok.signals["cls_logits"][23][0, :64]
    thumb = vtc.create("globalcom2")(tok).index[0, :16]
    assert torch.all(s0[thumb][:-1] >= s0[thumb][1:]) and not torch.all(thumb[:-1] < thumb[1:])
    clean = vtc.create("globalcom2", compat="clean")(tok).index[0, :16]
    assert torch.equal(clean, thumb.sort().values)


def test_scales_follow_the_thumbnail_and_can_drop_below_rho():
    """A thumbnail whose logits are high in the top-left quarter: crop (0,0) keeps more than rho,
    the others slightly less (no lower clip)."""
    side, N = 8, 64
    tok = make_tokens(2, 2, side, (80, 80), seed=6)
    s = tok.signals["cls_logits"][23].clone()
    s[0, :N] = torch.tensor([5.0 if (t // side < 4 and t % side < 4) else 0.0 for t in range(N)], dtype=torch.float64)
    tok = tok.replace(signals={"cls_logits": {23: s}})
    b = vtc.create("globalcom2").allocate(tok).budget[0].tolist()
    p = [math.exp(8.0) / (math.exp(8.0) + 3), 1 / (math.exp(8.0) + 3)]  # region sums 80 vs 0, T=10
    assert b == [16, int(64 * 0.25 * (1 + p[0] - 0.25))] + [int(64 * 0.25 * (1 + p[1] - 0.25))] * 3
    assert b[1] > 16 and b[2] < 16


# ---------------------------------------------------------------------- single partition
@pytest.mark.parametrize("compat", ["official", "clean"])
def test_single_partition(compat):
    g = torch.Generator().manual_seed(2)
    s = {23: torch.randn(2, 576, generator=g, dtype=torch.float64)}
    tok = VisualTokens(x=torch.randn(2, 576, 4, generator=g), signals={"cls_logits": s}, layer_space=CLIP_L)
    out = vtc.create("globalcom2", compat=compat)(tok)
    assert out.counts.tolist() == [144, 144]
    for b in range(2):
        want = sorted(range(576), key=lambda t: (-s[23][b, t].item(), t))[:144]
        assert out.index[b].tolist() == (want if compat == "official" else sorted(want))
    assert vtc.create("globalcom2").allocate(tok).budget.tolist() == [[144], [144]]


# ---------------------------------------------------------------------- layers read
def test_requires_and_one_hot_layer_marker():
    assert vtc.create("globalcom2").requires == {"cls_logits": ["last"]}
    assert CLIP_L.resolve("last") == 23  # the official layer on LLaVA-NeXT's CLIP-L
    assert vtc.create("globalcom2", layer=3).requires == {"cls_logits": [3]}
    one_hot = {l: torch.zeros(1, 64, dtype=torch.float64).index_fill_(1, torch.tensor([l]), 1.0) for l in range(24)}
    tok = VisualTokens(x=torch.randn(1, 64, 4), signals={"cls_logits": one_hot}, layer_space=CLIP_L)
    assert vtc.create("globalcom2", ratio=1 / 64)(tok).index.tolist() == [[23]]
    # AnyRes: layer l's crops are one-hot at token l; whatever the budget, each crop's best is 23
    P, N = 5, 64
    sig = {}
    for l in range(24):
        s = torch.zeros(P, N, dtype=torch.float64)
        s[:, l] = 50.0
        sig[l] = s.view(1, -1)
    tok = VisualTokens(x=torch.randn(1, P * N, 4), layout=Layout.for_anyres(8, (2, 2), image_size=(80, 80)),
                       signals={"cls_logits": sig}, layer_space=CLIP_L)
    out = vtc.create("globalcom2", ratio=1 / 64)(tok)
    # thumbnail: 1 token (23). Token 23 (row 2, col 7) lies in crop (0,1)'s region, which gets
    # p ~ 1, scale = (1 + 1 - 1/4)/64 and int(64 * scale) = 1 token: its own token 23; others 0
    assert out.index[0].tolist() == [23, 2 * N + 23]
    with pytest.raises(SignalError, match="cls_logits"):
        vtc.create("globalcom2")(tok.replace(signals={"cls_attn": sig}))


# ---------------------------------------------------------------------- guards
def test_errors_and_newline_policy():
    tok = make_tokens(2, 2, 8, (100, 160))
    with pytest.raises(LayoutError, match="image_size"):
        vtc.create("globalcom2")(tok.replace(layout=Layout.for_anyres(8, (2, 2))))
    with pytest.raises(LayoutError, match="for_anyres"):
        vtc.create("globalcom2")(tok.replace(layout=None))
    with pytest.raises(LayoutError, match="first in the pipeline"):
        vtc.create("globalcom2")(tok.keep_mask(tok.index != 64 + 26))
    with pytest.raises(ConfigError):
        vtc.create("globalcom2", temperature=0)
    with pytest.raises(ConfigError):
        vtc.create("globalcom2", ratio=0)
    assert vtc.create("globalcom2").newline_policy == "all_rows"
    assert vtc.create("globalcom2", compat="clean").newline_policy == "rows"
    # padding tokens already removed: same answer (GlobalCom² never ranks them)
    no_pad = vtc.create("globalcom2").allocate(tok).replace(budget=None)
    assert vtc.create("globalcom2")(no_pad).index.tolist() == vtc.create("globalcom2")(tok).index.tolist()


def test_small_retention_gives_crops_zero_budget():
    tok = make_tokens(1, 3, 6, (40, 180))
    op = vtc.create("globalcom2", ratio=0.05)  # thumbnail int(36*0.05)=1; crops of 24 tokens keep 0 or 1
    b = op.allocate(tok).budget[0].tolist()
    assert b[0] == 1 and 0 in b[1:]
    assert counts_per_group(op(tok), 4) == b


# ---------------------------------------------------------------------- batches and pipelines
def test_batch_of_different_grids_equals_one_by_one():
    a = make_tokens(2, 2, 8, (100, 160), seed=1)
    b = make_tokens(2, 1, 8, (200, 70), seed=2)
    batch = VisualTokens.from_list([a.x[0], b.x[0]], index=[a.index[0], b.index[0]], group=[a.group[0], b.group[0]],
                                   layout=[a.layout, b.layout],
                                   signals={"cls_logits": {23: [a.signals["cls_logits"][23][0],
                                                                b.signals["cls_logits"][23][0]]}}, layer_space=CLIP_L)
    for compat in ("official", "clean"):
        op = vtc.create("globalcom2", compat=compat)
        out = op(batch)
        for i, one in enumerate((a, b)):
            assert out.unbind_index()[i].tolist() == op(one).index[0].tolist()
        assert op.allocate(batch).budget[1].tolist() == op.allocate(b).budget[0].tolist() + [0, 0]


SELECTORS = ["divprune", "vtc-cls:layers=[22]", "random", "uniform", "tome", "pool"]


@pytest.mark.parametrize("selector", SELECTORS)
def test_selectors_fill_globalcom2_budgets(selector):
    tok = make_tokens(2, 2, 8, (100, 160), seed=5)
    tok.signals["cls_attn"] = {22: torch.rand(1, tok.num_tokens, dtype=torch.float64)}
    for spec in ("globalcom2", "globalcom2:compat=clean,ratio=0.5"):
        pipe = vtc.build(f"{spec} | {selector}")
        budget = pipe[0].allocate(tok).budget[0].tolist()
        got = counts_per_group(pipe(tok), 5)
        if selector == "pool":
            assert all(g <= b for g, b in zip(got, budget)) and all((g > 0) == (b > 0) for g, b in zip(got, budget))
            gh = max(int(budget[0] ** 0.5), 1)
            assert got[0] == gh * min(8, budget[0] // gh)
        else:
            assert got == budget, spec


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_official_half_precision_thumbnail_is_torchs_argsort(dtype):
    """compat='official' ranks the thumbnail as the official code does, ``argsort(s, descending=True)``
    on the logits in their own dtype, ties in torch's own order (a stable sort keeps other tokens)."""
    g = torch.Generator().manual_seed(9)
    differs = 0
    s = {23: (3 * torch.randn(3, 576, generator=g)).to(dtype)}
    tok = VisualTokens(x=torch.randn(3, 576, 4, generator=g), signals={"cls_logits": s}, layer_space=CLIP_L)
    out = vtc.create("globalcom2")(tok)
    for b in range(3):
        want = torch.argsort(s[23][b], descending=True)[:144].tolist()
        assert out.index[b].tolist() == want
        differs += want != torch.sort(s[23][b], descending=True, stable=True).indices[:144].tolist()
    # AnyRes: the thumbnail's tokens come first, in that order
    nh, nw, side = 2, 2, 24
    P, N = 1 + nh * nw, side * side
    logits = (3 * torch.randn(1, P * N, generator=g)).to(dtype)
    tok = VisualTokens(x=torch.randn(1, P * N, 4, generator=g), group=(torch.arange(P * N) // N).unsqueeze(0),
                       layout=Layout.for_anyres(side, (nh, nw), image_size=(300, 500)),
                       signals={"cls_logits": {23: logits}}, layer_space=CLIP_L)
    want = torch.argsort(logits[0, :N], descending=True)[:144].tolist()
    assert vtc.create("globalcom2")(tok).index[0, :144].tolist() == want
    differs += want != torch.sort(logits[0, :N], descending=True, stable=True).indices[:144].tolist()
    assert differs > 0
