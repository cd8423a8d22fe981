"""vtc.bench.stats: bootstrap intervals and paired tests, against values worked out by hand."""

from __future__ import annotations

import math
from math import comb

import numpy as np
import pytest

from vtc.bench.memory import CellMemory
from vtc.bench.metrics import Metric, get_metric
from vtc.bench.stats import adjust, interval, paired_test


def rows(scores, prefix="q"):
    return [{"qid": f"{prefix}{i}", "score": float(s), "prediction": "x", "answers": ["x"]} for i, s in enumerate(scores)]


def test_mcnemar_exact_by_hand():
    # the cell is right on 6 questions the reference misses and wrong on 4 it gets:
    # two-sided binomial test of 6 of 10 at p = 1/2 = 2 * P(X >= 6) = 2 * 386 / 1024
    ref = [1] * 4 + [0] * 6 + [1] * 10 + [0] * 10
    cell = [0] * 4 + [1] * 6 + [1] * 10 + [0] * 10
    t = paired_test(get_metric("exact"), rows(cell), rows(ref))
    assert t["test"] == "mcnemar-exact" and t["discordant"] == [6, 4] and t["n_paired"] == 30
    assert t["p_value"] == pytest.approx(2 * sum(comb(10, k) for k in range(6, 11)) / 1024)
    assert t["delta"] == pytest.approx(100 * 2 / 30)
    same = paired_test(get_metric("exact"), rows(ref), rows(ref))
    assert same["p_value"] == 1.0 and same["delta"] == 0.0 and same["discordant"] == [0, 0]


def test_paired_test_uses_only_shared_questions():
    t = paired_test(get_metric("exact"), rows([1, 1, 1, 0]), rows([0, 0], prefix="q"))
    assert t["n_paired"] == 2 and t["discordant"] == [2, 0] and t["delta"] == 100.0
    assert paired_test(get_metric("exact"), rows([1]), rows([1], prefix="other"))["n_paired"] == 0


def test_paired_bootstrap_for_graded_scores():
    rng = np.random.default_rng(1)
    ref = rng.choice([0.0, 0.3, 0.6, 0.9, 1.0], size=200)
    better = np.minimum(1.0, ref + rng.choice([0.0, 0.3], size=200, p=[0.5, 0.5]))
    m = get_metric("vqa")
    t = paired_test(m, rows(better), rows(ref))
    assert t["test"] == "paired-bootstrap" and t["delta"] == pytest.approx(100 * (better.mean() - ref.mean()))
    assert t["p_value"] < 0.01 and 0 < t["delta_low"] < t["delta"] < t["delta_high"]
    noise = paired_test(m, rows(ref), rows(ref))
    assert noise["p_value"] == 1.0 and noise["delta_low"] == noise["delta_high"] == 0.0


def test_interval_is_seeded_and_sized_like_the_normal_approximation():
    m = get_metric("exact")
    data = rows([1] * 63 + [0] * 37)
    lo, hi = interval(m, data)
    assert (lo, hi) == interval(m, data)          # deterministic
    assert lo < 63 < hi
    half = 100 * 1.96 * math.sqrt(0.63 * 0.37 / 100)   # 9.5 points
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    assert all(math.isnan(v) for v in interval(m, rows([1])))   # one question: no interval
    assert interval(m, rows([1, 1, 1])) == (100.0, 100.0)


def test_interval_resamples_units_and_strata():
    m = get_metric("mme")
    data = []
    for sub, n_img in (("existence", 6), ("count", 5), ("code_reasoning", 4)):
        for img in range(n_img):
            for j in range(2):
                data.append({"qid": f"{sub}/{img}/{j}", "qtype": sub, "score": float((img + j) % 3 != 0),
                             "prediction": "yes", "answers": ["yes"]})
    s = m.summarize(data)
    lo, hi = interval(m, data)
    assert lo <= s["score"] <= hi and hi <= 400   # two perception subtasks: at most 2 x 200
    t = paired_test(m, data, data)
    assert t["test"] == "paired-bootstrap" and t["n_paired"] == 15 and t["p_value"] == 1.0


def test_plugin_metric_with_its_own_summary():
    class Median(Metric):   # a plugin that overrides summarize() only: resampled row by row
        name = "median"

        def score(self, prediction, answers):
            return 0.0

        def summarize(self, rs):
            vals = [r["score"] for r in rs if r.get("score") is not None]
            return {"score": 100 * float(np.median(vals)) if vals else float("nan"), "n": len(vals)}

    m = Median()
    data = rows([0.2, 0.4, 0.6, 0.8, 1.0] * 4)
    lo, hi = interval(m, data)
    assert lo <= 60 <= hi
    t = paired_test(m, rows([0.3, 0.5, 0.7, 0.9, 1.0] * 4), data)
    assert t["test"] == "paired-bootstrap" and t["delta"] == pytest.approx(10.0) and t["n_paired"] == 20


def test_benjamini_hochberg():
    # sorted p: .01 .02 .03 .5 -> x 4/rank: .04 .04 .04 .5 (monotone from the top)
    assert adjust([0.5, 0.01, float("nan"), 0.03, 0.02]) == pytest.approx([0.5, 0.04, float("nan"), 0.04, 0.04], nan_ok=True)


def test_cell_memory_counts_the_cell_not_the_process():
    import torch

    big = torch.ones(64 * 2**20 // 4)   # 64 MiB live before the cell: not the cell's
    with CellMemory("cpu") as mem:
        x = torch.ones(32 * 2**20 // 4) + 1   # ~64 MiB at the peak (the ones and the sum)
        del x
    r = mem.result()
    assert r["kind"] in ("cpu_rss_growth", "cpu_rss_growth_lifetime")
    assert 24 * 2**20 <= r["peak_bytes"] <= 100 * 2**20 and r["base_bytes"] >= 64 * 2**20
    del big
