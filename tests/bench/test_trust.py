"""vtc.bench.trust: a config runs no code but vtc's unless the user allows a plugin; paths stay in their folder."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import yaml
from conftest import tiny_config

from vtc.bench import metrics
from vtc.bench.config import load_config
from vtc.bench.loaders import load_jsonl
from vtc.bench.rows import read_rows
from vtc.cli import main
from vtc.errors import ConfigError


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A plugin module on sys.path: on import it records that it ran and registers a metric and a loader."""
    name = f"vtc_test_plugin_{tmp_path.name}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        from vtc.bench.metrics import Metric, register_metric
        from vtc.bench.loaders import load_jsonl

        Path({str(marker)!r}).write_text("ran")

        @register_metric("answer_length")
        class AnswerLength(Metric):
            def score(self, prediction, answers):
                return float(len(prediction.strip()) == len(answers[0]))

        def my_loader(split, base_dir=None, **options):
            return load_jsonl(split, base_dir, **options)

        def my_source(entry):
            raise RuntimeError("never loaded in these tests")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)
    metrics._METRICS.pop("answer_length", None)  # registries are global: leave none behind


def _manifest(jsonl_task, tmp_path, **changes):
    data = yaml.safe_load(jsonl_task.read_text())
    data.update(changes)
    path = jsonl_task.parent / f"custom{len(list(jsonl_task.parent.glob('custom*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_module_functions_in_a_config_need_the_allow_list(tmp_path, jsonl_task, plugin):
    name, marker = plugin
    cases = [("loader", "os", tiny_config(_manifest(jsonl_task, tmp_path, loader="os:system"), tmp_path)),
             ("loader", name, tiny_config(_manifest(jsonl_task, tmp_path, loader=f"{name}:my_loader"), tmp_path)),
             ("model source", name, tiny_config(jsonl_task, tmp_path, models=[{"name": "m", "source": f"{name}:my_source"}]))]
    for field, module, cfg in cases:
        with pytest.raises(ConfigError, match=f"{field} .*from module '{module}', which is not an allowed plugin.*--plugin {module}"):
            load_config(cfg)
    assert not marker.exists()  # refused before anything was imported
    # allowed on the command line: imported (it runs), and its functions may be named
    cfg = load_config(tiny_config(_manifest(jsonl_task, tmp_path, loader=f"{name}:my_loader"), tmp_path), plugins=[name])
    assert marker.exists() and len(cfg.tasks[0][0].questions()) == 9
    with pytest.raises(ConfigError, match="not a module name"):
        load_config(tiny_config(jsonl_task, tmp_path), plugins=["os:system"])
    with pytest.raises(ConfigError, match="cannot be imported"):
        load_config(tiny_config(jsonl_task, tmp_path), plugins=["no_such_module_here"])


def test_a_plugins_key_imports_a_custom_metric_usable_by_name(tmp_path, jsonl_task, plugin, capsys):
    name, marker = plugin
    task = _manifest(jsonl_task, tmp_path, metric="answer_length")
    with pytest.raises(ConfigError, match="unknown metric 'answer_length'"):
        load_config(tiny_config(task, tmp_path / "run"))
    assert not marker.exists()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(task, tmp_path / "run", pipelines=[], limit=2, plugins=[name])))
    assert main(["bench", str(cfg), "--no-progress"]) == 0
    (rows_file,) = (tmp_path / "run" / "rows").iterdir()
    for r in read_rows(rows_file):  # scored by the plugin's metric
        assert r["score"] == float(len(r["prediction"]) == len(r["answers"][0]))
    captured = capsys.readouterr()
    assert "answer_length" in captured.out
    assert f"the config imports plugin module(s) {name} (this runs their code)" in captured.err


def test_trust_remote_code_and_pickled_weights_are_refused(tmp_path, jsonl_task, monkeypatch):
    def cfg(**options):
        return tiny_config(jsonl_task, tmp_path, models=[{"name": "m", "source": "hf", "path": "some/model",
                                                          "options": options}])

    with pytest.raises(ConfigError, match="--trust-remote-code"):
        load_config(cfg(trust_remote_code=True))
    assert load_config(cfg(trust_remote_code=True), trust_remote_code=True).models[0].trust_remote_code
    with pytest.raises(ConfigError, match="safetensors weights only"):
        load_config(cfg(use_safetensors=False))
    # the hf source asks transformers for safetensors only, and for remote code only when allowed
    from transformers import AutoModelForImageTextToText, AutoProcessor

    calls = []

    def fake(path, **kw):
        calls.append(kw)
        return object()

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", fake)
    monkeypatch.setattr(AutoProcessor, "from_pretrained", fake)
    from vtc.bench.models import _source

    for allowed in (False, True):
        entry = load_config(cfg(**({"trust_remote_code": True} if allowed else {})), trust_remote_code=allowed).models[0]
        _source("hf")(entry)
    assert [c.get("use_safetensors") for c in calls[::2]] == [True, True]
    assert [c["trust_remote_code"] for c in calls] == [False, False, True, True]


def test_image_paths_stay_inside_the_task_files_folder(tmp_path, jsonl_task, monkeypatch, capsys):
    import vtc.bench.runner as runner

    data = jsonl_task.parent / "data.jsonl"
    data.write_text(data.read_text() + json.dumps({"id": "evil", "image": "../../etc/hostname", "question": "q?",
                                                   "answers": ["a"]}) + "\n")
    with pytest.raises(ConfigError, match=r"data.jsonl:10: image path '.*etc/hostname' lies outside"):
        list(load_jsonl("test", jsonl_task.parent, path="data.jsonl"))
    with pytest.raises(ConfigError, match="image_root '/etc' lies outside"):
        list(load_jsonl("test", jsonl_task.parent, path="data.jsonl", image_root="/etc"))
    # through the CLI: the run stops before any model loads; the flag (or config key) allows it
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(jsonl_task, tmp_path / "run")))
    assert main(["bench", str(cfg), "--no-progress"]) == 2
    assert "--allow-absolute-paths" in capsys.readouterr().err
    for kw in ({"allow_absolute_paths": True}, {}):
        source = tiny_config(jsonl_task, tmp_path / "run", **({} if kw else {"allow_absolute_paths": True}))
        (task, sel), = load_config(source, **kw).tasks
        assert task.questions()[-1].qid == "evil"
    # a task manifest cannot allow it for itself
    manifest = _manifest(jsonl_task, tmp_path, options={"path": "data.jsonl", "allow_absolute_paths": True})
    with pytest.raises(ConfigError, match="the user's decision"):
        load_config(tiny_config(manifest, tmp_path)).tasks[0][0].questions()


def test_mqt_weights_are_safetensors_files_only(tmp_path, monkeypatch):
    import vtc

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="leaves the working folder"):
        vtc.build("mqt:weights=../../etc/passwd")
    with pytest.raises(ConfigError, match="not a .safetensors file"):
        vtc.build("mqt:weights=/etc/passwd")
    (tmp_path / "fake.safetensors").write_text("not safetensors at all")
    op = vtc.build("mqt:weights=fake.safetensors")[0]
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        op.load()
