"""vtc.integrations.options: newline policy and assembly point resolved from the operators' declarations."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import vtc
from vtc.errors import ConfigError
from vtc.integrations.options import ApplyOptions
from vtc.ops.base import OpConfig, Operator


@dataclass
class _Cfg(OpConfig):
    pass


def _op(policy=None, view=None, stage="vision"):
    cls = type("Fake", (Operator,), {"name": f"fake-{policy}-{view}", "Config": _Cfg, "newline_policy": policy,
                                     "anyres_view": view, "default_stage": stage,
                                     "forward": lambda self, t: t})
    return cls()


def test_auto_newline_takes_the_declared_policy_or_llava_next_standard():
    opts = ApplyOptions()
    assert opts.newline_policy(vtc.build("pool:keep=64")) == "rows"
    assert opts.newline_policy(vtc.build([_op("none"), vtc.create("divprune", keep=8)])) == "none"
    assert opts.newline_policy(vtc.build([_op("all_rows"), _op(None)])) == "all_rows"
    assert ApplyOptions(newline="none").newline_policy(vtc.build([_op("all_rows")])) == "none"
    with pytest.raises(ConfigError, match="different LLaVA-NeXT newline policies"):
        opts.newline_policy(vtc.build([_op("all_rows"), _op("none")]))
    with pytest.raises(ConfigError, match="newline_policy"):
        opts.newline_policy(vtc.build([_op("sometimes")]))


def test_assembly_point_follows_the_llm_operators_views():
    opts = ApplyOptions()
    # DivPrune's official code sees the assembled sequence; M3 pools partitions first
    assert opts.assembly_point(vtc.build("divprune:keep=64")) == 0
    assert opts.assembly_point(vtc.build("m3:keep=144 | divprune:keep=64")) == 1
    assert opts.assembly_point(vtc.build("random:keep=300 | m3:keep=144")) == 2
    assert opts.assembly_point(vtc.build("random:keep=300 | divprune:keep=64")) == 1
    assert ApplyOptions(llm_view="partitions").assembly_point(vtc.build("divprune:keep=64")) == 1
    assert ApplyOptions(llm_view="assembled").assembly_point(vtc.build("random:keep=300 | m3:keep=144")) == 1
    with pytest.raises(ConfigError, match="reorder them"):
        opts.assembly_point(vtc.build("divprune:keep=64 | m3:keep=36"))


def test_a_selector_filling_allocator_budgets_sees_the_partitions():
    opts = ApplyOptions()
    assert opts.assembly_point(vtc.build("hired:ratio=0.2 | divprune")) == 2  # divprune alone: 0
    assert opts.assembly_point(vtc.build("globalcom2 | divprune | divprune:keep=32")) == 2
    with pytest.raises(ConfigError, match="per-partition budgets"):
        ApplyOptions(llm_view="assembled").assembly_point(vtc.build("hired:ratio=0.2 | divprune"))


def test_unknown_and_bad_options():
    with pytest.raises(ConfigError, match="unknown option"):
        ApplyOptions.from_kwargs({"newlines": "none"})
    for bad in ({"position_ids": "gappy"}, {"newline": "some"}, {"llm_view": "x"}, {"unpad": "yes"}):
        with pytest.raises(ConfigError):
            ApplyOptions.from_kwargs(bad)
