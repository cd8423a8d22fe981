"""vtc.bench.latency: percentile summaries, the stage clock, and a profile's structure on the tiny model.

No timing value is asserted beyond being positive: speed claims come from eval/ runs, not tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from vtc.bench.latency import LatencyConfig, StageClock, profile, summarize
from vtc.errors import ConfigError


def test_summarize_median_and_p90():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s["median"] == 3.0 and s["p90"] == pytest.approx(4.6) and s["n"] == 5  # 1 + 0.9*4 = 4.6th order stat
    assert summarize([7.0]) == {"median": 7.0, "p90": 7.0, "n": 1}
    assert math.isnan(summarize([])["median"])


def test_stage_clock_accumulates_intervals():
    clock = StageClock(torch.device("cpu"))
    for _ in range(3):
        clock.start("a")
        clock.stop("a")
    clock.stop("never-started")
    assert len(clock.intervals_ms()["a"]) == 3 and clock.totals_ms()["a"] >= 0
    clock.reset()
    assert clock.totals_ms() == {}


def test_config_validation():
    assert LatencyConfig.from_config(False).enabled is False
    assert LatencyConfig.from_config({"repeats": 2}).repeats == 2
    with pytest.raises(ConfigError):
        LatencyConfig.from_config({"repeats": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        LatencyConfig.from_config({"repeat": 2})


def test_profile_on_the_tiny_model():
    from PIL import Image

    from vtc.bench.models import load_model, model_entry

    model, proc = load_model(model_entry({"name": "tiny", "source": "random-llava", "device": "cpu"}))
    inputs = proc(images=[Image.new("RGB", (32, 32))], text=["USER: <image>\nwhat ASSISTANT:"], return_tensors="pt")
    out = profile(model, inputs, LatencyConfig(warmup=0, repeats=2, new_tokens=3))
    for stage in ("vision_ms", "projector_ms", "prefill_ms", "ttft_ms", "tpot_ms"):
        assert out[stage]["n"] == 2 and out[stage]["median"] > 0, stage
    assert out["vision_ms"]["median"] < out["ttft_ms"]["median"]  # a stage is part of the first token's time
    assert out["peak_mem_bytes"] > 0 and out["peak_mem_kind"].startswith("rss")
    # the hooks are gone afterwards
    assert not model.model.vision_tower._forward_hooks and not model._forward_hooks


def test_an_allocator_handing_off_its_budgets_is_timed_as_an_operator():
    """``hired | random``: HiRED runs allocate() (no forward hook fires); its time must still count."""
    import time

    from PIL import Image

    import vtc
    from vtc.models.random import random_llava

    model, proc = random_llava()
    inputs = proc(images=[Image.new("RGB", (32, 32))], text=["USER: <image>\nwhat ASSISTANT:"], return_tensors="pt")
    pipe = vtc.build("hired:keep=16,top_layer=0,bottom_layer=2 | random")
    assert pipe.hands_off(0)
    hired, inner = pipe[0], pipe[0].allocate

    def slow_allocate(tokens):
        time.sleep(0.05)
        return inner(tokens)

    hired.allocate = slow_allocate
    with vtc.apply(model, pipe):
        out = profile(model, inputs, LatencyConfig(warmup=0, repeats=2, new_tokens=2), pipeline=pipe)
    assert out["operators_ms"]["n"] == 2 and out["operators_ms"]["median"] >= 50
    assert hired.allocate is slow_allocate  # the timing wrapper is gone, the instance's own method is back
