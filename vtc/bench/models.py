"""Model entries of a bench config: where a model comes from and how its prompts are written.

A config lists models as mappings::

    - name: llava-1.5-7b
      source: hf                          # hf | qwen-vl | tiny | random-llava | random-llava-next |
                                          # random-qwen2-vl | random-qwen2-5-vl | random-qwen3-vl |
                                          # package.module:function
      path: llava-hf/llava-1.5-7b-hf      # hf: a hub id or a local folder (from_pretrained)
      dtype: float16                      # float32 | float16 | bfloat16
      device: auto                        # auto: cuda when available, else cpu
      chat: "USER: <image>\\n{prompt} ASSISTANT:"   # or "auto": the processor's chat template
      options: {}                         # keyword arguments of the source

A source is a function ``source(entry) -> (model, processor)`` registered with
:func:`register_source`; ``random-llava`` / ``random-llava-next`` / ``random-qwen2-vl`` /
``random-qwen2-5-vl`` / ``random-qwen3-vl`` build the tiny random models of
:mod:`vtc.models.random` (offline, for smoke runs); ``qwen-vl`` loads a Qwen2-VL / Qwen2.5-VL /
Qwen3-VL checkpoint held in a local folder (use ``chat: auto``: the checkpoint's chat template
places the image). A ``package.module:function`` source must come from an allowed plugin module,
and ``trust_remote_code`` in ``options`` needs ``--trust-remote-code`` (:mod:`vtc.bench.trust`);
``hf`` and ``qwen-vl`` load safetensors weights only. Loaded models are cached per process.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vtc.bench.trust import TrustPolicy
from vtc.errors import ConfigError

__all__ = ["ModelEntry", "register_source", "load_model", "model_entry", "DTYPES", "DEFAULT_CHAT"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_CHAT = "USER: <image>\n{prompt} ASSISTANT:"
_KEYS = {"name", "source", "path", "dtype", "device", "chat", "options"}


@dataclass
class ModelEntry:
    """One model of a bench config (see the module docstring)."""

    name: str
    source: str = "hf"
    path: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    chat: str = DEFAULT_CHAT
    options: dict[str, Any] = field(default_factory=dict)
    #: the user passed --trust-remote-code (not part of the hash; see vtc.bench.trust)
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"model {self.name!r}: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.chat != "auto" and "{prompt}" not in self.chat:
            raise ConfigError(f"model {self.name!r}: chat must contain '{{prompt}}' (or be 'auto'), got {self.chat!r}")
        if self.source == "hf" and not self.path:
            raise ConfigError(f"model {self.name!r}: source 'hf' needs path: a hub id or a local folder")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def resolved_device(self, local_rank: int = 0) -> torch.device:
        if self.device == "auto":
            return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        return torch.device(self.device)

    def spec(self) -> dict[str, Any]:
        """What defines the model's outputs (for the cell hash); the device is not part of it."""
        return {"name": self.name, "source": self.source, "path": self.path, "dtype": self.dtype,
                "chat": self.chat, "options": self.options}

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:12]

    def format(self, prompt: str, processor: Any) -> str:
        """The full prompt text for one question (with the image placeholder)."""
        if self.chat != "auto":
            return self.chat.replace("{prompt}", prompt)
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        try:
            return processor.apply_chat_template(conv, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - processors without a template raise various errors
            raise ConfigError(f"model {self.name!r}: chat 'auto' needs a processor with a chat template ({e}); "
                              "give chat: 'USER: <image>\\n{prompt} ASSISTANT:' instead") from e


def model_entry(data: Mapping[str, Any] | str, trust: TrustPolicy | None = None) -> ModelEntry:
    """A ModelEntry from a config mapping (or a bare source name such as ``random-llava``).

    ``trust`` (:class:`~vtc.bench.trust.TrustPolicy`, default: nothing beyond vtc's built-ins)
    decides whether a ``package.module:function`` source and ``trust_remote_code`` are allowed."""
    trust = trust or TrustPolicy()
    if isinstance(data, str):
        data = {"name": data, "source": data}
    if not isinstance(data, Mapping):
        raise ConfigError(f"a model entry is a mapping (name, source, path, ...) or a source name, got {data!r}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ConfigError(f"model entry has unknown key(s) {unknown}; valid keys: {sorted(_KEYS)}")
    if "name" not in data:
        raise ConfigError(f"model entry needs a name, got {dict(data)!r}")
    owner = f"model {data['name']!r}"
    trust.check_function("model source", str(data.get("source", "hf")), owner)
    options = data.get("options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"{owner}: options is a mapping of keyword arguments, got {options!r}")
    trust.check_model_options(dict(options), owner)
    return ModelEntry(**data, trust_remote_code=trust.trust_remote_code)


Source = Callable[[ModelEntry], tuple[Any, Any]]
_SOURCES: dict[str, Source] = {}
_CACHE: dict[str, tuple[Any, Any]] = {}
#: source name -> modules that register it on import (the embedded models: ``tiny``)
_LAZY_SOURCES: dict[str, tuple[str, ...]] = {"tiny": ("vtc.models.tiny.bench",)}


def register_source(name: str):
    """Decorator registering a model source ``fn(entry) -> (model, processor)``."""

    def deco(fn: Source) -> Source:
        _SOURCES[name] = fn
        return fn

    return deco


def _source(name: str) -> Source:
    if name in _SOURCES:
        return _SOURCES[name]
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"model source {name!r}: cannot import {attr!r} from {mod!r} ({e})") from e
    for module in _LAZY_SOURCES.get(name, ()):  # sources that live with the models they load
        importlib.import_module(module)
        if name in _SOURCES:
            return _SOURCES[name]
    raise ConfigError(f"unknown model source {name!r}; registered: {', '.join(sorted(_SOURCES))} "
                      "(or name a function as 'package.module:function')")


def load_model(entry: ModelEntry, device: torch.device | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` for ``entry``, in eval mode on its device and dtype (cached per process)."""
    device = device or entry.resolved_device()
    key = f"{entry.hash}@{device}"
    if key not in _CACHE:
        model, processor = _source(entry.source)(entry)
        model = model.to(device=device, dtype=entry.torch_dtype).eval()
        _CACHE[key] = (model, processor)
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()


@register_source("random-llava")
def _random_llava(entry: ModelEntry):
    from vtc.models.random import random_llava

    return random_llava(**entry.options)


@register_source("random-llava-next")
def _random_llava_next(entry: ModelEntry):
    from vtc.models.random import random_llava_next

    return random_llava_next(**entry.options)


def _random_qwen(builder: str):
    def source(entry: ModelEntry):
        from vtc.models import random

        return getattr(random, builder)(**entry.options)

    return source


for _name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
    register_source("random-" + _name.replace("_", "-"))(_random_qwen(f"random_{_name}"))


@register_source("qwen-vl")
def _qwen_vl(entry: ModelEntry):
    """A Qwen VL checkpoint in the local folder ``path``, offline. ``options``: ``min_pixels`` /
    ``max_pixels`` (the processor's resize bounds, which set how many visual tokens an image gets;
    default: the checkpoint's), anything else goes to ``from_pretrained`` (``attn_implementation``)."""
    from pathlib import Path

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vtc.integrations.adapters import adapter_for

    if not entry.path or not Path(entry.path).is_dir():
        raise ConfigError(f"model {entry.name!r}: source 'qwen-vl' needs path: a local folder holding the checkpoint "
                          f"(config.json, weights, processor files), got {entry.path!r}")
    kwargs = dict(entry.options)
    pixels = {k: kwargs.pop(k) for k in ("min_pixels", "max_pixels") if k in kwargs}
    TrustPolicy(trust_remote_code=entry.trust_remote_code).check_model_options(kwargs, f"model {entry.name!r}")
    kwargs.pop("use_safetensors", None)
    # safetensors only, as the hf source: a pickled .bin checkpoint is refused instead of unpickled
    model = AutoModelForImageTextToText.from_pretrained(entry.path, dtype=entry.torch_dtype, local_files_only=True,
                                                        use_safetensors=True, **kwargs)
    family = adapter_for(model).family
    if family != "qwen_vl":
        raise ConfigError(f"model {entry.name!r}: {entry.path} holds a {type(model).__name__} ({family}), not a Qwen VL "
                          "checkpoint; use source 'hf' for it")
    processor = AutoProcessor.from_pretrained(entry.path, local_files_only=True, **pixels)
    processor.tokenizer.padding_side = "left"  # batched generation needs left padding
    return model, processor


@register_source("hf")
def _hf(entry: ModelEntry):
    """``AutoModelForImageTextToText`` + ``AutoProcessor`` from a hub id or a local folder."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = dict(entry.options)
    owner = f"model {entry.name!r}"
    TrustPolicy(trust_remote_code=entry.trust_remote_code).check_model_options(kwargs, owner)
    remote = bool(kwargs.pop("trust_remote_code", False))
    kwargs.pop("use_safetensors", None)
    # safetensors only: a pickled .bin checkpoint is refused by transformers instead of unpickled
    model = AutoModelForImageTextToText.from_pretrained(entry.path, dtype=entry.torch_dtype, use_safetensors=True,
                                                        trust_remote_code=remote, **kwargs)
    processor = AutoProcessor.from_pretrained(entry.path, trust_remote_code=remote)
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"  # batched generation needs left padding
    return model, processor
