"""What a bench config may do beyond vtc's built-ins: which code it may run and which files it may read.

A config, its task manifests and their JSONL files are data; someone else may have written them.
By default running them executes no code but vtc's and reads no file outside their own folders:

- **Plugins** (code). A config may name a model source or question loader as
  ``package.module:function`` only if ``package.module`` (or a package above it) is on the plugin
  allow-list: the modules passed as ``--plugin MODULE`` on the command line, plus those the config
  lists under its own ``plugins:`` key. Every allowed module is imported before the config's
  names are checked, so a plugin can also register metrics (:func:`vtc.bench.metrics.register_metric`),
  operators (:func:`vtc.register`), loaders and model sources under plain names. **A** ``plugins:``
  **key runs code**: importing a module executes it; read a config from someone else before
  running it if it has one.
- **Remote code.** ``trust_remote_code`` in a model's options (Hugging Face's switch for running
  Python files that come with a checkpoint) is refused unless the user passes ``--trust-remote-code``.
- **Paths.** Image paths of a JSONL task (and its ``image_root``) must resolve inside the JSONL
  file's folder (``../../etc/hostname`` is refused) unless the user passes ``--allow-absolute-paths``
  or the config sets ``allow_absolute_paths: true``. Paths are compared after normalising ``..``;
  symbolic links inside the folder are followed (whoever owns the folder placed them).

:class:`TrustPolicy` carries these decisions from the command line to the config, task and model
layers; :func:`vtc.bench.config.load_config` builds it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vtc.errors import ConfigError

__all__ = ["TrustPolicy", "inside"]


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` lies in folder ``root`` once both are absolute and ``..`` is normalised away."""
    p = os.path.normpath(os.path.abspath(path))
    r = os.path.normpath(os.path.abspath(root))
    return os.path.commonpath([p, r]) == r


@dataclass(frozen=True)
class TrustPolicy:
    """The plugin allow-list and the two opt-ins (see the module docstring)."""

    plugins: tuple[str, ...] = ()
    trust_remote_code: bool = False
    allow_absolute_paths: bool = False

    @classmethod
    def build(cls, *, cli_plugins: Iterable[str] = (), config_plugins: object = None, trust_remote_code: bool = False,
              allow_absolute_paths: bool = False) -> TrustPolicy:
        if config_plugins is None:
            config_plugins = []
        if isinstance(config_plugins, str):
            config_plugins = [config_plugins]
        if not isinstance(config_plugins, (list, tuple)) or not all(isinstance(m, str) for m in config_plugins):
            raise ConfigError(f"plugins: a list of module names (package.module), got {config_plugins!r}")
        names = []
        for m in [*cli_plugins, *config_plugins]:
            m = m.strip()
            if not m or not all(part.isidentifier() for part in m.split(".")):
                raise ConfigError(f"plugin {m!r} is not a module name (package.module; no ':function')")
            if m not in names:
                names.append(m)
        return cls(plugins=tuple(names), trust_remote_code=bool(trust_remote_code),
                   allow_absolute_paths=bool(allow_absolute_paths))

    def import_plugins(self) -> None:
        """Import every allowed plugin module (this runs their code)."""
        for m in self.plugins:
            try:
                importlib.import_module(m)
            except ImportError as e:
                raise ConfigError(f"plugin module {m!r} cannot be imported ({e}); is it installed or on PYTHONPATH?") from e

    def allows_module(self, module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in self.plugins)

    def check_function(self, kind: str, name: str, owner: str) -> None:
        """Refuse a ``module:function`` ``name`` (a ``kind``: "model source" or "loader") outside the allow-list."""
        if ":" not in name:
            return  # a registered name: vtc's own, or one a plugin registered
        module = name.partition(":")[0]
        if not self.allows_module(module):
            raise ConfigError(
                f"{owner}: {kind} {name!r} would import and call code from module {module!r}, which is not an "
                f"allowed plugin. If you trust it, allow it with --plugin {module} (or list it under plugins: in the "
                "config: that runs its code)")

    def check_model_options(self, options: dict, owner: str) -> None:
        """Refuse options that would run code shipped with a checkpoint or load pickled weights."""
        if options.get("trust_remote_code") and not self.trust_remote_code:
            raise ConfigError(
                f"{owner}: trust_remote_code runs Python files that come with the checkpoint; vtc refuses it unless you "
                "pass --trust-remote-code (only for checkpoints whose code you have read)")
        if "use_safetensors" in options and options["use_safetensors"] is not True:
            raise ConfigError(f"{owner}: vtc loads safetensors weights only (pickled .bin files can run code); "
                              "remove use_safetensors from the model's options")

    def check_path(self, path: str | os.PathLike, root: str | os.PathLike, what: str) -> None:
        """Refuse ``path`` outside folder ``root`` unless absolute paths are allowed."""
        if self.allow_absolute_paths or inside(path, root):
            return
        raise ConfigError(
            f"{what} {str(path)!r} lies outside {str(Path(root))!r}; task paths must stay inside the task file's folder. "
            "If you trust the task, pass --allow-absolute-paths (or set allow_absolute_paths: true in the config)")


#: the policy of the Python API when none is given: nothing beyond the built-ins
DEFAULT = TrustPolicy()
