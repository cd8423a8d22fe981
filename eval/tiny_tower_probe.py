"""What an embedded model's vision tower encodes per patch: linear-probe accuracy on its frozen features.

The language model can only answer from what the tower's feature-layer patch tokens carry. This
script fits a fresh linear head (the training-time auxiliary head's shape, ``vtc.models.tiny.aux``)
on the frozen features of ``--train-scenes`` scenes of the ``val`` split and reports, on
``--test-scenes`` scenes of the ``test`` split:

- colour / shape / size accuracy on the patches an object covers (the object under the patch centre),
- how well the patches holding an object's centre are found (recall of the top-k centre logits,
  k = the number of objects), which counting needs,
- object-count accuracy of the pooled CLS token.

    PYTHONPATH=. python eval/tiny_tower_probe.py --model tiny-llava [--json eval/results/tiny_tower_probe.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def _features(tm, ds, split: str, start: int, n: int):
    from vtc.models.tiny.aux import canvas_views, view_targets
    from vtc.models.tiny.forward import tower
    from vtc.models.tiny.render import render, render_labels

    scenes = [ds.scene(split, i) for i in range(start, start + n)]
    pv = tm.processor.image_processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    grid = tm.model.config.vision_config.image_size // tm.model.config.vision_config.patch_size
    with torch.no_grad():
        feats, cls = tower(tm.model, pv)
    t = [view_targets(s, render_labels(s), canvas_views(s.height, s.width, None), grid) for s in scenes]
    return feats, cls, {k: torch.from_numpy(np.concatenate([x[k] for x in t])) for k in t[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llava", help="variant name (assets/) or exported folder (LLaVA-1.5 layout)")
    ap.add_argument("--train-scenes", type=int, default=250)
    ap.add_argument("--test-scenes", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="append the result as a JSON line to this file")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from vtc.models.tiny.aux import AuxHeads
    from vtc.models.tiny.datasets import dataset
    from vtc.models.tiny.loading import load
    from vtc.models.tiny.scene import COLORS, SHAPES

    t0 = time.time()
    tm = load(a.model)
    tm.model.eval()
    ds = dataset("shapes")
    train = [_features(tm, ds, "val", i, min(50, a.train_scenes - i)) for i in range(0, a.train_scenes, 50)]
    feats, cls, t = _features(tm, ds, "test", 0, a.test_scenes)
    head = AuxHeads(feats.shape[-1])
    opt = torch.optim.Adam(head.parameters(), 3e-3)
    for _ in range(a.epochs):
        for f, c, tt in train:
            loss = head.loss(f, c, tt)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        p, c = head.patch(feats), head.cls(cls)
    nc, ns = len(COLORS) + 1, len(SHAPES) + 1
    obj = t["color"] > 0
    res = {"model": a.model, "patches_with_object": int(obj.sum())}
    for name, sl, target in (("color", slice(0, nc), t["color"]), ("shape", slice(nc, nc + ns), t["shape"]),
                             ("size", slice(nc + ns, nc + ns + 3), t["size"])):
        res[f"{name}_acc"] = float((p[..., sl].argmax(-1)[obj] == target[obj]).float().mean())
        counts = torch.bincount(target[obj], minlength=sl.stop - sl.start)
        res[f"{name}_majority"] = float(counts.max() / counts.sum())  # the accuracy of always guessing the commonest
    centre = t["center"] > 0
    hits = total = 0
    for i in range(len(p)):
        k = int(centre[i].sum())
        if k:
            top = set(p[i, :, -1].topk(k).indices.tolist())
            hits += len(top & set(centre[i].nonzero().flatten().tolist()))
            total += k
    res["centre_recall_at_k"] = hits / max(1, total)
    res["cls_count_acc"] = float((c[:, :13].argmax(-1) == t["count"]).float().mean())
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "a") as fh:
            fh.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
