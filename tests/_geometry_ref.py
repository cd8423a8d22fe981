"""Independent references of LLaVA-NeXT's crop geometry for the tests (plain loops, no vtc code).

``ref_unpad``: each implementation's unpad arithmetic as it computes it; ``ref_cells``: which crop
cells survive and where each is emitted, under the transposed tiling of HiRED's fork and the rank
placement of GlobalCom²'s code.
"""

import torch


def ref_unpad(grid, size, rounding):
    """Each implementation's unpad, written as it computes it: current transformers rounds to 7
    decimals, original LLaVA truncates the float64 product, HiRED's fork gets the image size as a
    LongTensor row (so its ratios and product are torch float32)."""
    H, W = grid
    oh, ow = size
    if rounding == "float32":
        oh, ow = torch.tensor(oh), torch.tensor(ow)
    wider = bool(ow / oh > W / H)
    x = oh * (W / ow) if wider else ow * (H / oh)
    new = int(round(x, 7)) if rounding == "transformers" else int(x)
    pad = ((H if wider else W) - new) // 2
    return (pad, H - pad, 0, W) if wider else (0, H, pad, W - pad)


def ref_cells(nh, nw, side, size, rounding="transformers", transposed=False, rank=False):
    """{token index: (kept by the unpad, emitted (row, col))} of one image, by loops."""
    tw = nh if transposed else nw  # the crops (row-major) fill tw columns of crops
    H, W = nh * nw // tw * side, tw * side
    r0, r1, c0, c1 = ref_unpad((H, W), size, rounding)
    out = {}
    for c in range(nh * nw):
        a, b = divmod(c, tw)
        inside = [(i, j) for i in range(side) for j in range(side)
                  if r0 <= a * side + i < r1 and c0 <= b * side + j < c1]
        for t in range(side * side):
            i, j = divmod(t, side)
            ok = (i, j) in inside
            if rank and ok:  # GlobalCom²: the cell numbered by its rank among the crop's unpadded cells
                i, j = divmod(inside.index((i, j)), side)
            out[(c + 1) * side * side + t] = (ok, (a * side + i, b * side + j))
    return out
