"""Pipelines: every build form gives the same Pipeline, configs round-trip, stages and budgets flow."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import vtc
from vtc import VisualTokens, registry
from vtc.errors import BudgetError, ConfigError
from vtc.ops.base import Allocator, OpConfig
from vtc.pipeline import Pipeline, build, parse_spec
from vtc.taps import LayerSpace

SPEC = "vtc-cls:keep=192 | tome:keep=64"
DICTS = [{"op": "vtc-cls", "keep": 192}, {"op": "tome", "keep": 64}]


def _forms(tmp_path: Path):
    yaml_path = tmp_path / "pipe.yaml"
    yaml_path.write_text("pipeline:\n  - op: vtc-cls\n    keep: 192\n  - {op: tome, keep: 64}\n")
    list_yaml = tmp_path / "list.yml"
    list_yaml.write_text("- op: vtc-cls\n  keep: '192'\n- op: tome\n  keep: 64\n")
    return {
        "string": SPEC,
        "string-spaced": "  vtc-cls : keep = 192|tome:keep=64 ",
        "list-of-strings": ["vtc-cls:keep=192", "tome:keep=64"],
        "list-of-dicts": DICTS,
        "string-values": [{"op": "vtc-cls", "keep": "192"}, {"op": "tome", "keep": "64"}],
        "pipeline-dict": {"pipeline": DICTS, "name": "mine"},
        "yaml-path-str": str(yaml_path),
        "yaml-path": yaml_path,
        "yaml-list": list_yaml,
        "operators": [vtc.create("vtc-cls", keep=192), vtc.create("tome", keep=64)],
        "pipeline": Pipeline([vtc.create("vtc-cls", keep=192), vtc.create("tome", keep=64)]),
    }


def test_every_build_form_gives_the_same_pipeline(tmp_path):
    ref = build(DICTS)
    assert [op.name for op in ref] == ["vtc-cls", "tome"] and len(ref) == 2
    for form, spec in _forms(tmp_path).items():
        p = build(spec)
        assert isinstance(p, Pipeline), form
        assert p == ref, form
        assert p.spec() == ref.spec() and p.hash == ref.hash, form


def test_single_operator_forms():
    ref = build("divprune:keep=64")
    assert build({"op": "divprune", "keep": 64}) == ref == build(vtc.create("divprune", keep=64))
    assert build([{"op": "divprune", "keep": 64}]) == ref
    assert build(ref) is ref


def test_identity_pipelines():
    t = VisualTokens(x=torch.randn(1, 4, 2))
    for spec in ("", "identity", None, []):
        p = build(spec)
        assert len(p) == 0 and str(p) == "identity" and p(t) is t


def test_spec_and_yaml_round_trip(tmp_path):
    p = build("vtc-cls:keep=192,layers=[20,22] | tome:keep=64,protect_cls=true,compat=clean")
    spec = p.spec()
    assert spec[0] == {"op": "vtc-cls", "stage": None, "keep": 192, "ratio": None, "layers": [20, 22]}
    assert spec[1]["protect_cls"] is True and spec[1]["compat"] == "clean"
    assert build(spec) == p
    assert build(json.loads(json.dumps(spec))) == p
    path = tmp_path / "p.yaml"
    p.save(path)
    assert path.read_text() == p.to_yaml()
    assert build(path) == p and build(str(path)).hash == p.hash
    assert str(p) == "vtc-cls:keep=192,layers=[20,22] | tome:keep=64,protect_cls=true,compat=clean"
    assert build(str(p)) == p


def test_hash_is_stable():
    # a literal: if this changes, every stored bench result keyed by the hash is orphaned. It changed once,
    # on purpose: vtc-cls's default layers became tower-relative (["feature-6..feature"], was [16, ..., 22])
    assert build(SPEC).hash == "3d6a75878f4f"
    assert build("divprune:ratio=0.098").hash == "8cf9d565c1cc"
    assert build(SPEC).hash != build("vtc-cls:keep=191 | tome:keep=64").hash
    assert build(SPEC).hash != build("tome:keep=64 | vtc-cls:keep=192,stage=llm").hash


def test_equality_depends_on_arguments_and_order():
    assert build("random:keep=4") != build("random:keep=4,seed=1")
    assert build("random:keep=4 | uniform:keep=2") != build("uniform:keep=4 | random:keep=2")
    assert build("random:keep=4") != "random:keep=4"


def test_unknown_names_raise_config_errors_listing_valid_ones():
    with pytest.raises(ConfigError, match="divprune.*vtc-cls"):
        build("nope:keep=3")
    with pytest.raises(ConfigError, match="valid arguments: stage, keep, ratio"):
        build({"op": "divprune", "k": 3})
    with pytest.raises(ConfigError, match="'op' key"):
        build([{"keep": 3}])
    with pytest.raises(ConfigError, match="cannot build"):
        build(3.5)


@pytest.mark.parametrize("bad", ["divprune:keep", "divprune:=3", "divprune | | tome:keep=3", "divprune:keep=3 |"])
def test_malformed_strings(bad):
    with pytest.raises(ConfigError):
        build(bad)


def test_parse_spec_keeps_brackets_together():
    assert parse_spec("vtc-cls:layers=[16, 17],keep=3 | tome") == [
        {"op": "vtc-cls", "layers": "[16, 17]", "keep": "3"},
        {"op": "tome"},
    ]


def test_type_errors_name_the_argument():
    with pytest.raises(ConfigError, match="divprune.keep"):
        build("divprune:keep=many")
    with pytest.raises(ConfigError, match="tome.protect_cls"):
        build({"op": "tome", "keep": 3, "protect_cls": "perhaps"})
    with pytest.raises(ConfigError, match="vtc-cls.layers"):
        build("vtc-cls:keep=3,layers=[a,b]")


def test_yaml_is_read_safely(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"pipeline: !!python/object/apply:os.mkdir ['{marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build(evil)
    assert not marker.exists()
    obj = tmp_path / "obj.yaml"
    obj.write_text("- !!python/object:collections.OrderedDict {op: divprune}\n")
    with pytest.raises(ConfigError):
        build(obj)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        build(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("pipeline: [op: divprune\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build(broken)
    extra = tmp_path / "extra.yaml"
    extra.write_text("pipeline: [{op: divprune, keep: 3}]\nbudget: 4\n")
    with pytest.raises(ConfigError, match="'pipeline'"):
        build(extra)


def test_bad_budgets_are_rejected_at_build_time():
    for spec in ("divprune:keep=0", "divprune:ratio=1.2", "divprune:ratio=0", "divprune:keep=3,ratio=0.5"):
        with pytest.raises(vtc.VtcError, match="keep|ratio"):
            build(spec)


def test_selector_without_budget_raises_when_run():
    p = build("divprune")
    with pytest.raises(BudgetError, match="no budget"):
        p(VisualTokens(x=torch.randn(1, 4, 2)))


# ---------------------------------------------------------------------- stages
def test_stage_order_is_checked():
    with pytest.raises(ConfigError, match="order vision-stage operators first"):
        build("divprune:keep=64 | vtc-cls:keep=32")  # llm then vision
    p = build("divprune:keep=64 | vtc-cls:keep=32,stage=llm")
    assert [op.stage for op in p] == ["llm", "llm"]
    p = build("vtc-cls:keep=64 | random:keep=32 | divprune:keep=16 | m3:keep=9")
    assert [op.stage for op in p] == ["vision", "vision", "llm", "llm"]
    assert [op.name for op in p.stage_ops("vision")] == ["vtc-cls", "random"]
    assert p.has_stage("llm") and not build("random:keep=3").has_stage("llm")


def test_forward_runs_one_stage_at_a_time():
    t = VisualTokens(x=torch.randn(2, 36, 4, dtype=torch.float64))
    p = build("random:keep=20 | divprune:keep=8")
    mid = p(t, stage="vision")
    assert mid.counts.tolist() == [20, 20]
    out = p(mid, stage="llm")
    full = p(t)
    assert out.counts.tolist() == [8, 8] and torch.equal(out.index, full.index)
    assert torch.equal(full.index, p[1](p[0](t)).index)
    with pytest.raises(ConfigError, match="stage"):
        p(t, stage="prefill")


def test_requires_is_the_union_of_the_operators():
    p = build("vtc-cls:keep=64,layers=[20,22] | tome:keep=32,metric=keys,layer=23 | vtc-cls:keep=16,layers=[16]")
    assert p.requires == {"cls_attn": [16, 20, 22], "keys": [23]}
    assert build("divprune:keep=3").requires == {}


# ---------------------------------------------------------------------- allocators
@dataclasses.dataclass
class _AllocCfg(OpConfig):
    per_group: int = 2


class _FirstPerGroup(Allocator):
    """Test allocator: budget ``per_group`` for every partition; alone it keeps each partition's first tokens."""

    Config = _AllocCfg
    default_stage = "vision"
    calls: list = []

    def allocate(self, tokens):
        type(self).calls.append("allocate")
        G = tokens.num_groups
        return tokens.replace(budget=torch.full((tokens.batch_size, G), self.config.per_group, dtype=torch.long))

    def forward(self, tokens):
        type(self).calls.append("forward")
        t = self.allocate(tokens)
        rows, G = t.split_groups()
        keep = torch.arange(rows.num_tokens).unsqueeze(0) < rows.budget
        return t.join_groups(rows.keep_mask(keep).replace(budget=None), G)


@pytest.fixture
def alloc():
    name = "test-alloc"
    registry.register(name)(_FirstPerGroup)
    _FirstPerGroup.calls = []
    yield name
    registry._REGISTRY.pop(name, None)


def _grouped_tokens():
    g = torch.Generator().manual_seed(1)
    group = torch.tensor([0] * 6 + [1] * 6).repeat(2, 1)
    return VisualTokens(x=torch.randn(2, 12, 5, generator=g, dtype=torch.float64), group=group)


def test_allocator_followed_by_selector_only_allocates(alloc):
    p = build(f"{alloc}:per_group=3 | divprune")
    assert p.hands_off(0) and not p.hands_off(1)
    out = p(_grouped_tokens())
    assert _FirstPerGroup.calls == ["allocate"]
    assert out.counts.tolist() == [6, 6] and out.budget is None
    assert (out.group == 0).sum(1).tolist() == [3, 3] and (out.group == 1).sum(1).tolist() == [3, 3]


def test_allocator_alone_or_last_runs_its_own_forward(alloc):
    out = build(alloc)(_grouped_tokens())
    assert _FirstPerGroup.calls == ["forward", "allocate"]
    assert out.index[0].tolist() == [0, 1, 6, 7]
    _FirstPerGroup.calls = []
    build(f"random:keep=10,stage=vision | {alloc}")(_grouped_tokens())
    assert _FirstPerGroup.calls == ["forward", "allocate"]


def test_selector_after_allocator_must_not_set_its_own_budget(alloc):
    for spec, arg in ((f"{alloc} | divprune:keep=4", "keep="), (f"{alloc} | random:ratio=0.5", "ratio="),
                      (f"{alloc} | pool:grid=2", "grid=")):
        with pytest.raises(ConfigError, match=f"drop {arg} from"):
            build(spec)
    build(f"{alloc} | tome:r=2")  # tome's r= is a merge rate, not a budget
    build(f"{alloc} | m3:keep=9")  # m3 does not select to a budget, so it does not fill one


def test_allocator_hands_off_across_stages(alloc):
    p = build(f"{alloc}:per_group=2 | divprune")
    t = p(_grouped_tokens(), stage="vision")
    assert t.budget.tolist() == [[2, 2], [2, 2]] and t.counts.tolist() == [12, 12]
    out = p(t, stage="llm")
    assert out.counts.tolist() == [4, 4]


def test_pipeline_rejects_non_operators():
    for bad in (torch.nn.Identity(), "divprune:keep=3", {"op": "divprune"}):
        with pytest.raises(ConfigError, match="vtc operators"):
            Pipeline([bad])


# ---------------------------------------------------------------------- bad inputs get named errors (issue 16)
@pytest.mark.parametrize("spec, words", [
    ("divprune:keep=.nan", "divprune.keep: expected an integer, got nan"),
    ("divprune:keep=.inf", "divprune.keep: expected an integer, got inf"),
    ("divprune:keep=3,keep=400", "'keep' is given twice"),
    ({"op": ["divprune"]}, "'op' names one operator as a string"),
    ({"op": "divprune", "keep": 3, "stage": "gpu"}, "stage: 'gpu' is not one of 'vision', 'llm'"),
    ("divprune:keep=3,stage=gpu", "stage: 'gpu' is not one of 'vision', 'llm'"),
    ([None, "divprune:keep=3"], "pipeline entry 0 is empty"),
    (["divprune:keep=3", None], "pipeline entry 1 is empty"),
])
def test_bad_specs_raise_named_errors(spec, words):
    with pytest.raises(ConfigError, match=words):
        build(spec)


def test_numpy_numbers_are_accepted():
    np = pytest.importorskip("numpy")
    assert build({"op": "divprune", "keep": np.int64(5)}) == build("divprune:keep=5")
    assert build({"op": "random", "ratio": np.float32(0.5)}) == build("random:ratio=0.5")
    with pytest.raises(ConfigError):
        build({"op": "divprune", "keep": np.float64(2.5)})


def test_yaml_files_that_include_themselves_are_refused(tmp_path):
    me = tmp_path / "me.yaml"
    me.write_text(f"pipeline: {me}\n")
    with pytest.raises(ConfigError, match="includes itself"):
        build(me)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yml"
    a.write_text(f"pipeline: [{b}]\n")
    b.write_text(f"- {a}\n")
    with pytest.raises(ConfigError, match="includes itself"):
        build(a)
    ok = tmp_path / "ok.yaml"
    ok.write_text("pipeline: [{op: divprune, keep: 3}]\n")
    both = tmp_path / "both.yaml"
    both.write_text(f"pipeline: [{ok}, {ok}]\n")  # the same file twice is not a cycle
    assert len(build(both)) == 2


def test_yaml_duplicate_keys_are_refused(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("pipeline:\n  - {op: divprune, keep: 3, keep: 400}\n")
    with pytest.raises(ConfigError, match="given twice"):
        build(f)


def test_pipelines_and_operators_refuse_bare_tensors():
    from vtc.errors import InputError

    x = torch.randn(2, 16, 4)
    with pytest.raises(InputError, match="VisualTokens\\(x=features\\)"):
        build("divprune:keep=3")(x)
    with pytest.raises(InputError, match="'divprune' takes vtc.VisualTokens"):
        vtc.create("divprune", keep=3)(x)


def test_huge_keep_keeps_everything():
    t = VisualTokens(x=torch.randn(2, 9, 3))
    assert build(f"divprune:keep={2 ** 63}")(t) is t
    masked = VisualTokens(x=torch.randn(2, 9, 3), mask=torch.arange(9).expand(2, 9) < torch.tensor([[9], [5]]))
    assert build(f"random:keep={2 ** 63}")(masked).counts.tolist() == [9, 5]


@pytest.mark.parametrize("spec", ["m3:keep=4", "pool:keep=4", "divprune:keep=3", "tome:keep=3", "uniform:keep=3",
                                  "hired", "globalcom2", "hired | divprune", "vtc-cls:keep=3"])
def test_an_empty_batch_is_returned_as_it_is(spec):
    p = build(spec)
    space = LayerSpace(24, feature_layer=22)
    sig = {s: {l: torch.rand(0, 16) for l in space.resolve_all(layers)} for s, layers in p.requires.items()}
    t = VisualTokens(x=torch.randn(0, 16, 4), layout=vtc.Layout.grid(4), signals=sig, layer_space=space)
    assert p(t).batch_size == 0 and p[0](t).batch_size == 0


# ---------------------------------------------------------------------- validation once, and the fast mode
def test_side_inputs_are_validated_at_the_entry():
    from vtc.errors import InputError

    x = torch.randn(1, 16, 4)
    for bad in (float("nan"), 0.0, -1.0, float("inf")):
        t = VisualTokens(x=x, size=torch.full((1, 16), 2.0).index_fill(1, torch.tensor([5]), bad),
                         layout=vtc.Layout.grid(4))
        with pytest.raises(InputError, match="size must be a finite count > 0.*token 5"):
            build("pool:keep=4")(t)
    attn = torch.rand(1, 16)
    attn[0, 3] = float("nan")
    t = VisualTokens(x=x, signals={"cls_attn": {22: attn}})
    with pytest.raises(InputError, match="signals\\['cls_attn'\\]\\[22\\] holds NaN/Inf.*token 3"):
        build("vtc-cls:keep=3,layers=[22]")(t)
    with pytest.raises(InputError, match="'vtc-cls'"):
        vtc.create("vtc-cls", keep=3, layers=[22])(t)
    # a signal no operator reads is not checked; padding is never checked
    assert build("divprune:keep=3")(t).counts.tolist() == [3]
    padded = VisualTokens(x=x.clone(), mask=torch.arange(16).unsqueeze(0) < 10)
    padded.x[0, 12] = float("nan")
    assert build("divprune:keep=3")(padded).counts.tolist() == [3]


def test_validate_false_skips_the_check_and_gives_the_same_result():
    t = VisualTokens(x=torch.randn(2, 36, 4, dtype=torch.float64), layout=vtc.Layout.grid(6))
    p = build("random:keep=20 | divprune:keep=8")
    fast = Pipeline(list(p), validate=False)
    assert torch.equal(fast(t).index, p(t).index) and torch.equal(p(t, validate=False).index, p(t).index)
    bad = t.replace(x=t.x.clone())
    bad.x[0, 0, 0] = float("nan")
    with pytest.raises(vtc.errors.InputError):
        p(bad)
    fast(bad)  # not checked: the caller vouched for its input
    # the integration's entry points: check once per stage, then run operator by operator
    p.check_input(t, stage="vision")
    mid = p.run_op(0, t)
    assert torch.equal(p.run_op(1, mid, fast=True).index, p(t).index)
    with pytest.raises(ConfigError, match="stage must be one of"):
        p.check_input(t, stage="gpu")
