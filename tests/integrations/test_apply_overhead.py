"""What vtc.apply adds to one prefill: dispatched aten ops and host syncs (vtc/ops/opcount.py), gated.

The wrapped forward of the tiny random LLaVA and LLaVA-NeXT is counted against the stock forward on
the same inputs. The first call validates the pipeline's input and fills the geometry caches; later
calls run the operators in fast mode, read everything the host needs from the compaction in one
transfer and index with cached tables, so they add no host sync to the stock forward (which has its
own) and a few dozen small ops. ``python eval/bench_ops.py --what prefill --before main`` prints the
before/after table.
"""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.ops.opcount import count_ops


@pytest.fixture(scope="module")
def inputs(small_models):
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(0)
    images = [Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((96, 96), (100, 260))]
    text = ["user : <image> what is this ? assistant :", "<image> describe the picture"]
    return {kind: small_models[kind][1](images=images, text=text, return_tensors="pt", padding=True)
            for kind in ("llava", "llava_next")}


def _added(model, batch, spec):
    with torch.inference_mode():
        model(**batch)
        _, stock = count_ops(lambda: model(**batch))
        with vtc.apply(model, spec):
            _, first = count_ops(lambda: model(**batch))
            _, steady = count_ops(lambda: model(**batch))
    return ((first.ops - stock.ops, first.syncs - stock.syncs), (steady.ops - stock.ops, steady.syncs - stock.syncs),
            dict(steady.sync_names))


# (model, pipeline, most ops added per steady-state prefill); main added 93-99 ops and 18-20 syncs
# to LLaVA, 204-221 ops and 20-27 syncs to LLaVA-NeXT
@pytest.mark.parametrize("kind, spec, most_ops", [("llava", "identity", 60), ("llava", "random:keep=16", 100),
                                                  ("llava_next", "identity", 115)])
def test_steady_state_prefill_adds_no_host_sync(small_models, inputs, kind, spec, most_ops):
    model, _ = small_models[kind]
    (first_ops, first_syncs), (ops, syncs), names = _added(model, inputs[kind], spec)
    assert syncs <= 0, names  # the compaction's one transfer replaces stock's own checks
    assert ops <= most_ops
    assert first_syncs <= 1  # the first call validates each stage's input once


def test_the_first_call_validates_and_later_calls_do_not(small_models, inputs):
    """Validation once per handle: a NaN feature is refused on the first call only."""
    model, _ = small_models["llava"]
    batch = inputs["llava"]
    proj = model.model.multi_modal_projector
    with torch.inference_mode(), vtc.apply(model, "random:keep=16,stage=llm") as h:
        hook = proj.register_forward_hook(lambda m, a, out: out.fill_(float("nan")))
        try:
            with pytest.raises(vtc.errors.InputError, match="NaN"):
                model(**batch)
        finally:
            hook.remove()
        model(**batch)  # validates and passes
        hook = proj.register_forward_hook(lambda m, a, out: out.fill_(float("nan")))
        try:
            model(**batch)  # fast mode: not checked again
        finally:
            hook.remove()
        assert h.last.counts == [16, 16]
