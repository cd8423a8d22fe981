"""The operator registry: registration rules, typed configs and their coercion, error messages."""

from dataclasses import dataclass
from typing import Literal

import pytest

import vtc
from vtc import registry
from vtc.errors import ConfigError, VtcError
from vtc.ops.base import OpConfig, Operator, Selector
from vtc.registry import coerce, create, get_op, list_ops, make_config, register

BUILTIN = ["divprune", "m3", "pool", "random", "tome", "uniform", "vtc-cls"]


@pytest.fixture
def scratch_name():
    """A registry name that is removed again after the test."""
    name = "test-scratch-op"
    yield name
    registry._REGISTRY.pop(name, None)


def test_list_ops_has_the_builtin_operators():
    ops = list_ops()
    assert ops == sorted(ops)
    assert set(BUILTIN) <= set(ops)
    assert vtc.list_ops() == ops


def test_get_op_and_create():
    from vtc.ops.divprune import DivPrune, DivPruneConfig

    assert get_op("divprune") is DivPrune and DivPrune.name == "divprune"
    op = create("divprune", keep="64")
    assert isinstance(op, DivPrune) and isinstance(op.config, DivPruneConfig)
    assert op.config.keep == 64 and op.config.ratio is None and op.stage == "llm"
    assert DivPrune(keep=64).spec() == op.spec() == DivPrune(DivPruneConfig(keep=64)).spec()


def test_unknown_operator_lists_the_registered_ones():
    with pytest.raises(ConfigError) as e:
        create("divprun", keep=3)
    for name in BUILTIN:
        assert name in str(e.value)


def test_unknown_argument_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        create("vtc-cls", keep=3, layer=16)
    msg = str(e.value)
    assert "'layer'" in msg and "layers" in msg and "keep" in msg and "ratio" in msg and "stage" in msg


def test_operator_constructor_errors():
    from vtc.ops.divprune import DivPrune
    from vtc.ops.tome import ToMeConfig

    with pytest.raises(ConfigError, match="not both"):
        DivPrune(DivPrune.Config(keep=3), keep=4)
    with pytest.raises(ConfigError, match="DivPruneConfig"):
        DivPrune(ToMeConfig(keep=3))


@pytest.mark.parametrize(
    "name, args, words",
    [
        ("divprune", {"keep": 0}, "positive"),
        ("divprune", {"keep": -3}, "positive"),
        ("random", {"ratio": 0.0}, r"\(0, 1\]"),
        ("random", {"ratio": 1.5}, r"\(0, 1\]"),
        ("uniform", {"keep": 3, "ratio": 0.5}, "not both"),
        ("tome", {"r": 0}, "positive"),
        ("m3", {"keep": 5}, "square"),
        ("m3", {"keep": 0}, "square"),
        ("pool", {"grid": [2, 2], "keep": 4}, "not both"),
        ("pool", {"grid": [0, 2]}, "positive"),
        ("vtc-cls", {"layers": []}, "at least one layer"),
        ("divprune", {"stage": "prefill"}, "stage"),
    ],
)
def test_bad_arguments_raise_vtc_errors(name, args, words):
    with pytest.raises(VtcError, match=words):
        create(name, **args)


@dataclass
class _Cfg:
    n: int = 1
    f: float = 1.0
    b: bool = False
    s: str = "a"
    opt: int | None = None
    lst: list[int] | None = None
    tup: tuple[int, str] = (1, "a")
    lit: Literal["official", "clean"] = "official"


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("n", "64", 64),
        ("n", 64.0, 64),
        ("f", "0.25", 0.25),
        ("f", 1, 1.0),
        ("f", "1", 1.0),
        ("b", "true", True),
        ("b", False, False),
        ("s", "x", "x"),
        ("opt", "none", None),
        ("opt", "null", None),
        ("opt", None, None),
        ("opt", "7", 7),
        ("lst", "[16, 17]", [16, 17]),
        ("lst", "16", [16]),
        ("lst", (1, 2), [1, 2]),
        ("tup", ["2", "b"], (2, "b")),
        ("lit", "clean", "clean"),
    ],
)
def test_coercion(field, value, expected):
    hint = __import__("typing").get_type_hints(_Cfg)[field]
    out = coerce(value, hint, f"cfg.{field}")
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("n", "abc", "expected an integer"),
        ("n", 6.5, "expected an integer"),
        ("n", True, "expected an integer"),
        ("f", "x", "expected a number"),
        ("b", "maybe", "true/false"),
        ("b", 1, "true/false"),
        ("s", 3, "expected a string"),
        ("opt", "seven", "expected an integer, got 'seven' \\(or none\\)"),
        ("lst", "abc", "expected a list, got 'abc' \\(or none\\)"),
        ("tup", [1], "2 values"),
        ("lit", "fast", "'official', 'clean'"),
    ],
)
def test_coercion_errors_name_the_field(field, value, words):
    hint = __import__("typing").get_type_hints(_Cfg)[field]
    with pytest.raises(ConfigError, match=words) as e:
        coerce(value, hint, f"cfg.{field}")
    assert f"cfg.{field}" in str(e.value)


def test_make_config_coerces_every_field():
    cfg = make_config(get_op("tome"), {"keep": "64", "protect_cls": "true", "compat": "clean", "layer": "23"})
    assert (cfg.keep, cfg.protect_cls, cfg.compat, cfg.layer) == (64, True, "clean", 23)
    with pytest.raises(ConfigError, match="tome.metric"):
        make_config(get_op("tome"), {"metric": "cosine"})


def test_register_rules(scratch_name):
    with pytest.raises(ConfigError, match="contain none of"):
        register("a|b")
    with pytest.raises(ConfigError, match="contain none of"):
        register("")
    with pytest.raises(ConfigError, match="Operator subclass"):
        register(scratch_name)(object)

    class NoConfig(Operator):
        Config = None

    with pytest.raises(ConfigError, match="dataclass"):
        register(scratch_name)(NoConfig)

    @register(scratch_name)
    class Scratch(Selector):
        def select(self, tokens, k):
            return tokens

    assert get_op(scratch_name) is Scratch and Scratch.name == scratch_name and scratch_name in list_ops()
    assert register(scratch_name)(Scratch) is Scratch  # re-registering the same class is fine

    class Other(Operator):
        Config = OpConfig

    with pytest.raises(ConfigError, match="already registered"):
        register(scratch_name)(Other)
