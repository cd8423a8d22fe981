"""Packaging: the wheel ships the embedded models and the eval configs, and vtc finds them once installed.

The wheel is built (offline, no build isolation) from a copy of what setup.py / pyproject.toml
read, so the test neither writes into the repository nor depends on its build/ folder. The
editable wheel of the same copy checks that setup.py's folder mapping also works with ``-e``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["vtc", "assets", "eval/configs", "eval/tasks", "setup.py", "pyproject.toml", "README.md"]


def _source_copy(dest: Path) -> Path:
    for rel in SHIPPED:
        src, dst = ROOT / rel, dest / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A wheel and an editable wheel of a copy of the sources, built by setuptools' PEP 517 hooks (what
    ``pip wheel . --no-build-isolation`` and ``pip install -e .`` call), offline."""
    tmp = tmp_path_factory.mktemp("build")
    src = _source_copy(tmp / "src")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    built = {"src": src}
    for hook in ("build_wheel", "build_editable"):  # one process each: setuptools keeps state between builds
        dest = tmp / hook
        dest.mkdir()
        code = f"import sys; from setuptools import build_meta as b; print('BUILT', b.{hook}(sys.argv[1]))"
        out = subprocess.run([sys.executable, "-c", code, str(dest)], cwd=src, env=env, capture_output=True, text=True,
                             timeout=240)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        name = [line for line in out.stdout.splitlines() if line.startswith("BUILT ")][-1].split()[1]
        built[hook] = dest / name
    return built


@pytest.fixture(scope="module")
def wheel(built) -> Path:
    return built["build_wheel"]


def _repo_files(folder: str, pattern: str = "**/*") -> list[str]:
    base = ROOT / folder
    return sorted(p.relative_to(base).as_posix() for p in base.glob(pattern) if p.is_file() and "__pycache__" not in p.parts)


def test_the_wheel_holds_the_code_the_models_and_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    code = [f"vtc/{f}" for f in _repo_files("vtc", "**/*.py")]
    assets = [f"vtc/_assets/{f}" for f in _repo_files("assets")]
    configs = [f"vtc/_eval/configs/{f}" for f in _repo_files("eval/configs", "*.yaml")]
    tasks = [f"vtc/_eval/tasks/{f}" for f in _repo_files("eval/tasks", "*.yaml")]
    assert any(f.endswith(".safetensors") for f in assets) and "vtc/_eval/configs/quick.yaml" in configs
    missing = sorted(set(code + assets + configs + tasks) - names)
    assert not missing, missing
    assert not [n for n in names if n.startswith("vtc/_eval/") and n.endswith(".py")]  # eval's scripts stay out
    # every task manifest a shipped config names (relative to it) is in the wheel too
    for cfg in configs:
        data = yaml.safe_load((ROOT / "eval/configs" / Path(cfg).name).read_text())
        for t in data["tasks"]:
            ref = t["task"] if isinstance(t, dict) else t
            assert os.path.normpath(f"vtc/_eval/configs/{ref}") in names, (cfg, ref)


def test_installed_vtc_finds_its_models_and_configs_outside_the_repository(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = ("import vtc.resources as r, vtc.models.tiny.assets as a; from vtc.bench.config import load_config; "
            "cfg = load_config('quick'); print(r.asset_dir()); print(a.model_dir('tiny-llava')); "
            "print(cfg.tasks[0][0].base_dir); print(len(cfg.cells()))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("VTC_ASSETS", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assets, model, tasks, cells = out.stdout.split()
    assert Path(assets) == site / "vtc/_assets" and (Path(model) / "model.safetensors").is_file()
    assert Path(tasks) == site / "vtc/_eval/tasks" and int(cells) > 10


def test_an_editable_install_maps_the_same_folders(built):
    src = built["src"]
    with zipfile.ZipFile(built["build_editable"]) as z:
        (finder,) = [n for n in z.namelist() if n.startswith("__editable___vtc") and n.endswith("_finder.py")]
        text = z.read(finder).decode()
    for package, folder in [("vtc", "vtc"), ("vtc._assets", "assets"), ("vtc._eval.configs", "eval/configs"),
                            ("vtc._eval.tasks", "eval/tasks")]:
        assert f"'{package}': '{src / folder}'" in text, (package, text[:2000])
