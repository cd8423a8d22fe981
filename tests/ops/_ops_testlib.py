"""Helpers shared by the operator tests: synthetic tokens, per-image views, field-by-field comparison.

Nothing here calls an operator; the brute-force references live in each test file.
"""

from __future__ import annotations

import numpy as np
import torch

from vtc import Layout, VisualTokens
from vtc.taps import LayerSpace

#: the layers of LLaVA-1.5's CLIP-L tower (24 layers, features from layer 22), where the synthetic
#: signals below are recorded: operators' tower-relative default layers resolve against it
CLIP_L = LayerSpace(24, feature_layer=22)


def grid_tokens(counts, h, w=None, *, D=6, seed=0, parts=1, signals=None, size=False, dtype=torch.float64,
                full=False, layer_space=CLIP_L):
    """A batch whose image ``b`` holds ``counts[b]`` tokens of ``parts`` partitions of ``h x w`` patches.

    Tokens are a random subset of the grid cells (raster order within partition order), or every cell
    when ``full``; ``index`` is the position in the concatenation of the partitions, ``group`` is set
    when ``parts > 1`` and ``layout`` always. ``signals``: ``{name: (layers, trailing_dim or None)}``.
    ``size``: random sizes in [1, 4) (as if tokens had been merged before). ``layer_space``: the
    tower the signals' layer numbers belong to (default LLaVA-1.5's CLIP-L).
    """
    w = h if w is None else w
    g = torch.Generator().manual_seed(seed)
    P = parts
    per = h * w
    xs, idxs, groups, sizes = [], [], [], []
    sig = {name: {l: [] for l in layers} for name, (layers, _) in (signals or {}).items()}
    for n in counts:
        if full:
            pos = torch.arange(P * per)
        else:
            pos = torch.randperm(P * per, generator=g)[:n].sort().values
        n = pos.numel()
        xs.append(torch.randn(n, D, generator=g, dtype=dtype))
        idxs.append(pos)
        groups.append(pos // per)
        sizes.append(1 + 3 * torch.rand(n, generator=g, dtype=dtype))
        for name, (layers, trail) in (signals or {}).items():
            for l in layers:
                shape = (n,) if trail is None else (n, trail)
                t = torch.rand(*shape, generator=g, dtype=dtype)
                sig[name][l].append(t / t.sum() if name == "cls_attn" else t)
    layout = Layout(grids=((h, w),) * P)
    return VisualTokens.from_list(
        xs, index=idxs, group=groups if P > 1 else None, size=sizes if size else None,
        signals=sig or None, layout=layout, layer_space=layer_space,
    )


def image(t: VisualTokens, b: int) -> VisualTokens:
    """Image ``b`` of a batch as a batch of one (its valid tokens only)."""
    n = int(t.counts[b])
    lay = t.layouts()[b]
    return VisualTokens(
        x=t.x[b : b + 1, :n],
        index=t.index[b : b + 1, :n],
        size=None if t.size is None else t.size[b : b + 1, :n],
        group=None if t.group is None else t.group[b : b + 1, :n],
        signals={k: {l: s[b : b + 1, :n] for l, s in v.items()} for k, v in t.signals.items()},
        layout=lay,
        budget=None if t.budget is None else t.budget[b : b + 1],
        layer_space=t.layer_space,
    )


def rows(t: VisualTokens, b: int) -> dict[str, torch.Tensor]:
    """Every per-token field of image ``b`` (valid tokens only), keyed by name."""
    n = int(t.counts[b])
    out = {"x": t.x[b, :n], "index": t.index[b, :n], "size": t.sizes[b, :n]}
    out["group"] = (t.group if t.group is not None else torch.zeros_like(t.index))[b, :n]
    for name, per_layer in t.signals.items():
        for l, s in per_layer.items():
            out[f"{name}[{l}]"] = s[b, :n]
    return out


def assert_images_equal(a: VisualTokens, b: VisualTokens, ia: int = 0, ib: int = 0, *, rtol=0.0, atol=0.0):
    """Image ``ia`` of ``a`` and image ``ib`` of ``b`` hold the same tokens, field by field, in order."""
    ra, rb = rows(a, ia), rows(b, ib)
    assert ra.keys() == rb.keys()
    for k in ra:
        torch.testing.assert_close(ra[k], rb[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def assert_batch_equals_alone(op, t: VisualTokens, *, rtol=0.0, atol=0.0):
    """Running ``op`` on the batch gives, for every image, what running it on that image alone gives."""
    out = op(t)
    for b in range(t.batch_size):
        alone = op(image(t, b))
        assert_images_equal(out, alone, b, 0, rtol=rtol, atol=atol)
    return out


def assert_kept_aligned(inp: VisualTokens, out: VisualTokens):
    """Every output token is an input token (found by its index) with all its fields unchanged."""
    for b in range(inp.batch_size):
        ri, ro = rows(inp, b), rows(out, b)
        where = {int(v): i for i, v in enumerate(ri["index"].tolist())}
        src = torch.tensor([where[int(v)] for v in ro["index"].tolist()], dtype=torch.long)
        for k in ri:
            torch.testing.assert_close(ro[k], ri[k][src], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def assert_left_packed(t: VisualTokens):
    if t.mask is not None:
        n = t.mask.sum(1, keepdim=True)
        assert torch.equal(t.mask, torch.arange(t.num_tokens).unsqueeze(0) < n)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def top_k_positions(scores, k: int) -> list[int]:
    """Positions of the ``k`` largest scores, ties to the lower position, by descending score."""
    return sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))[:k]


def partition_budget_check(op_factory, t: VisualTokens, budget: torch.Tensor, *, rtol=0.0, atol=0.0, exact=True):
    """With ``budget [B, G]`` the op gives, per (image, partition), what it gives on that partition alone
    with ``keep = budget`` (nothing for a 0 budget), and the partitions come out in order. ``exact``: each
    partition holds exactly ``min(budget, present)`` tokens (else at most that many)."""
    out = op_factory(None)(t.replace(budget=budget))
    assert out.budget is None
    for b in range(t.batch_size):
        r_out = rows(out, b)
        got_groups = r_out["group"].tolist()
        assert got_groups == sorted(got_groups)
        one = image(t, b)
        for p in range(budget.shape[1]):
            sel = r_out["group"] == p
            present = int((rows(one, 0)["group"] == p).sum())
            want = min(int(budget[b, p]), present)
            assert int(sel.sum()) == want if exact else int(sel.sum()) <= want
            if int(budget[b, p]) == 0 or present == 0:
                continue
            part = one.keep_mask(one.group == p if one.group is not None else torch.ones_like(one.valid))
            alone = op_factory(int(budget[b, p]))(part)
            r_alone = rows(alone, 0)
            for k in r_alone:
                torch.testing.assert_close(r_out[k][sel], r_alone[k], rtol=rtol, atol=atol,
                                           msg=lambda m, k=k, b=b, p=p: f"image {b} partition {p} {k}: {m}")
    return out
