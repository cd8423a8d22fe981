"""Where vtc's shipped data lives: the embedded models and the eval configs, installed or in a checkout.

The repository keeps them at its top level (``assets/``, ``eval/configs/``, ``eval/tasks/``); a
wheel or a non-editable ``pip install .`` ships them inside the package as ``vtc/_assets`` and
``vtc/_eval/{configs,tasks}`` (setup.py maps the folders). :func:`data_dir` finds them through
``importlib.resources`` when they are installed, and falls back to the repository's folders for a
checkout on ``PYTHONPATH`` or an editable install. ``$VTC_ASSETS`` overrides the models' folder.

``vtc bench quick`` runs the shipped ``quick.yaml``: :func:`config_path` resolves such a bare name
to a shipped config (its task manifests are found beside it, as in the repository).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from vtc.errors import ConfigError

__all__ = ["data_dir", "asset_dir", "config_path", "list_configs"]

#: kind -> (folder inside the installed package, folder in the repository)
_PLACES = {"assets": ("_assets", "assets"), "configs": ("_eval/configs", "eval/configs"),
           "tasks": ("_eval/tasks", "eval/tasks")}


def data_dir(kind: str) -> Path:
    """The folder of shipped data ``kind`` (``"assets"``, ``"configs"`` or ``"tasks"``); it may not exist."""
    inside, repo = _PLACES[kind]
    packaged = Path(str(resources.files("vtc"))) / inside
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / repo


def asset_dir() -> Path:
    """``$VTC_ASSETS`` if set, else the shipped embedded models' folder."""
    env = os.environ.get("VTC_ASSETS")
    if env:
        return Path(env).expanduser()
    return data_dir("assets")


def list_configs() -> list[str]:
    """Names of the shipped bench configs (``quick``, ``ablation``, ...)."""
    folder = data_dir("configs")
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def config_path(name_or_path: str | os.PathLike) -> Path:
    """A bench config file: ``name_or_path`` itself when it is a file, else the shipped config of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and name in list_configs():
        return data_dir("configs") / f"{name}.yaml"
    raise ConfigError(f"bench config {str(name_or_path)!r} does not exist; give a YAML file or the name of a shipped "
                      f"config: {', '.join(list_configs()) or '(none installed)'}")
