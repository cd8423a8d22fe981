"""Auxiliary training losses on the vision tower (training only; not part of the saved models).

Trained from scratch on a small budget, a tower learns slowly through the language loss alone,
and its CLS token (which LLaVA drops) would get no training signal at all, leaving the CLS
attention that VTC-CLS, HiRED or GlobalCom² read meaningless. So on procedural images two small
heads add dense supervision from the scene spec:

- per patch (the LLaVA feature layer, ``hidden_states[-2]``): the colour, shape and size class of the
  object under the patch centre (or background), and whether an object's centre lies in the patch;
- on the CLS token (last layer, after ``post_layernorm``, as CLIP's pooled output): how many objects
  the view holds (0..12) and which colour x shape pairs occur (multi-label).

A "view" is what one tower pass sees: the whole canvas for LLaVA; for LLaVA-NeXT the base view
(whole canvas, downscaled) and each AnyRes crop. Images without a scene (easy-VQA) get no aux loss.
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from vtc.models.tiny.scene import COLORS, SHAPES, Scene

__all__ = ["AuxHeads", "view_targets", "canvas_views", "MAX_COUNT"]

MAX_COUNT = 12
_COLORS = list(COLORS)
_NC, _NS = len(COLORS), len(SHAPES)


def canvas_views(height: int, width: int, view: int | None) -> list[tuple[int, int, int, int]]:
    """``(y0, x0, h, w)`` canvas regions seen by each tower pass: the whole canvas, then (AnyRes,
    ``view`` = the tower's image size) the ``view x view`` crops in row-major order.

    Assumes canvases whose sides are multiples of ``view`` (the procedural ones are: no resize or
    padding happens before cropping)."""
    out = [(0, 0, height, width)]
    if view is not None:
        if height % view or width % view:
            raise ValueError(f"canvas {height}x{width} is not a multiple of the {view}-pixel view")
        out += [(i * view, j * view, view, view) for i in range(height // view) for j in range(width // view)]
    return out


def view_targets(scene: Scene, labels: np.ndarray, views: list[tuple[int, int, int, int]], grid: int) -> dict:
    """Targets for each view's ``grid x grid`` patches and CLS token (numpy arrays, views stacked)."""
    V, n = len(views), grid * grid
    color = np.zeros((V, n), np.int64)
    shape = np.zeros((V, n), np.int64)
    size = np.zeros((V, n), np.int64)
    center = np.zeros((V, n), np.float32)
    count = np.zeros((V,), np.int64)
    present = np.zeros((V, _NC * _NS), np.float32)
    objs = scene.objects
    ocolor = np.array([0] + [_COLORS.index(o.color) + 1 for o in objs])
    oshape = np.array([0] + [SHAPES.index(o.shape) + 1 for o in objs])
    osize = np.array([0] + [1 if o.size == "small" else 2 for o in objs])
    g = np.arange(grid)
    for v, (y0, x0, h, w) in enumerate(views):
        ys = (y0 + (g + 0.5) * h / grid).astype(np.int64)
        xs = (x0 + (g + 0.5) * w / grid).astype(np.int64)
        ids = labels[ys[:, None], xs[None, :]].reshape(-1)
        color[v], shape[v], size[v] = ocolor[ids], oshape[ids], osize[ids]
        k = 0
        for o in objs:
            if y0 <= o.y < y0 + h and x0 <= o.x < x0 + w:
                r, c = int((o.y - y0) * grid // h), int((o.x - x0) * grid // w)
                center[v, r * grid + c] = 1.0
                present[v, _COLORS.index(o.color) * _NS + SHAPES.index(o.shape)] = 1.0
                k += 1
        count[v] = min(k, MAX_COUNT)
    return {"color": color, "shape": shape, "size": size, "center": center, "count": count, "present": present}


class AuxHeads(nn.Module):
    """Linear heads on the tower's patch features and pooled CLS, with their summed losses."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.patch = nn.Linear(dim, (_NC + 1) + (_NS + 1) + 3 + 1)
        self.cls = nn.Linear(dim, (MAX_COUNT + 1) + _NC * _NS)

    def loss(self, patches: Tensor, cls: Tensor, t: dict[str, Tensor]) -> Tensor:
        """``patches [V, n, D]``, ``cls [V, D]`` of the views that have targets ``t``; a scalar."""
        p = self.patch(patches).float()
        a, b = _NC + 1, _NC + 1 + _NS + 1
        loss = (F.cross_entropy(p[..., :a].flatten(0, 1), t["color"].flatten())
                + F.cross_entropy(p[..., a:b].flatten(0, 1), t["shape"].flatten())
                + F.cross_entropy(p[..., b:b + 3].flatten(0, 1), t["size"].flatten())
                + F.binary_cross_entropy_with_logits(p[..., -1], t["center"]))
        c = self.cls(cls).float()
        loss = loss + F.cross_entropy(c[:, :MAX_COUNT + 1], t["count"]) + \
            F.binary_cross_entropy_with_logits(c[:, MAX_COUNT + 1:], t["present"])
        return loss
