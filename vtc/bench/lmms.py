"""lmms-eval model wrapper: any lmms-eval task on a model whose visual tokens a vtc pipeline compresses.

::

    pip install "vtc[lmms]"
    lmms-eval --model vtc_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,pipeline="divprune:keep=64" --tasks textvqa_val,gqa

lmms-eval scores the answers with its own task code, so these numbers are lmms-eval's. The
wrapper loads the model (``pretrained``: a Hugging Face id or folder, or ``tiny:NAME`` for an
embedded model of ``assets/``), attaches ``pipeline`` with :func:`vtc.apply` for the whole run
(``pipeline=none`` or no pipeline: the uncompressed model), writes each prompt with the
processor's chat template (``chat=auto``, the default for Hugging Face models) or a template such
as ``chat="USER: <image>\\n{prompt} ASSISTANT:"``, and answers greedily. Options of
``vtc.apply`` pass through (``position_ids=original``, ``newline=...``); ``dtype`` (default
float16 on CUDA, float32 on CPU), ``device``, ``batch_size``.

Registration: lmms-eval (0.7) finds external models through the entry-point group
``lmms_eval.models``; vtc's ``pyproject.toml`` declares ``vtc_llava = "vtc.bench.lmms:manifest"``
there, so installing vtc is all it takes. Nothing here is LLaVA-specific: the model loads through
``AutoModelForImageTextToText`` and compresses through ``vtc.apply``, so every family ``vtc.apply``
supports works under the same wrapper (``vtc`` is an alias of ``vtc_llava``). Generation tasks
only (``generate_until``); one process (for several GPUs use ``vtc bench`` with ``torchrun``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as e:  # pragma: no cover - exercised only without lmms-eval
    raise ImportError("vtc.bench.lmms needs lmms-eval: pip install 'vtc[lmms]'") from e

import torch

__all__ = ["VtcLlava", "manifest", "MODEL_ID"]

MODEL_ID = "vtc_llava"


def manifest():
    """The lmms-eval model manifest (the ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VtcLlava", aliases=("vtc",))


def _unquote(value: Any) -> Any:
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


class VtcLlava(lmms):
    """lmms-eval's model interface over a Hugging Face vision-language model compressed by vtc."""

    is_simple = True

    def __init__(self, pretrained: str, pipeline: str | None = None, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 1, chat: str | None = None, max_new_tokens: int = 128, **options: Any) -> None:
        super().__init__()
        from vtc.bench.models import DEFAULT_CHAT, ModelEntry, load_model

        pretrained, pipeline, chat = _unquote(pretrained), _unquote(pipeline), _unquote(chat)
        options = {k: _unquote(v) for k, v in options.items() if k != "max_batch_size"}
        dev = torch.device(device if device not in (None, "", "auto") else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype in (None, "", "auto"):
            dtype = "float16" if dev.type == "cuda" else "float32"
        source, path = ("tiny", str(pretrained)[5:]) if str(pretrained).startswith("tiny:") else ("hf", str(pretrained))
        if chat is None:
            chat = DEFAULT_CHAT if source == "tiny" else "auto"
        self.entry = ModelEntry(name=MODEL_ID, source=source, path=path, dtype=str(dtype), device=str(dev), chat=chat)
        self.model, self.processor = load_model(self.entry, dev)
        self._device = dev
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        self.max_new_tokens = int(max_new_tokens)
        self.pipeline = None if pipeline in (None, "", "none", "None") else str(pipeline)
        self.handle = None
        if self.pipeline is not None:
            import vtc

            self.handle = vtc.apply(self.model, self.pipeline, **options)
        elif options:
            raise TypeError(f"vtc_llava: {sorted(options)} are vtc.apply options; they need a pipeline=")
        self.kept_tokens: list[int] = []  # visual tokens the LLM received, per answered request

    # ------------------------------------------------------------------ lmms interface
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def _prompt(self, context: str, n_images: int) -> str:
        if self.entry.chat == "auto":
            conv = [{"role": "user", "content": [*({"type": "image"} for _ in range(n_images)), {"type": "text", "text": context}]}]
            return self.processor.apply_chat_template(conv, add_generation_prompt=True)
        body = self.entry.chat.replace("{prompt}", context)
        return body.replace("<image>", "<image>" * n_images) if n_images != 1 else body

    @torch.inference_mode()
    def _answer(self, contexts: Sequence[str], visuals: Sequence[list[Any]], gen: dict[str, Any]) -> list[str]:
        images = [im.convert("RGB") for vs in visuals for im in vs]
        prompts = [self._prompt(c, len(vs)) for c, vs in zip(contexts, visuals)]
        inputs = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
        inputs = {k: (v.to(self._device, self.entry.torch_dtype) if torch.is_floating_point(v) else v.to(self._device))
                  if torch.is_tensor(v) else v for k, v in inputs.items()}
        temperature = float(gen.get("temperature", 0) or 0)
        kwargs = dict(max_new_tokens=int(gen.get("max_new_tokens", self.max_new_tokens)), num_beams=int(gen.get("num_beams", 1)),
                      do_sample=temperature > 0)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=gen.get("top_p") or 1.0)
        out = self.model.generate(**inputs, **kwargs)
        texts = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        last = getattr(self.handle, "last", None)
        if getattr(last, "counts", None) is not None:
            self.kept_tokens.extend(int(c) for c in last.counts)
        return texts

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out: list[str] = []
        reqs = [r.args for r in requests]
        for start in range(0, len(reqs), self.batch_size):
            chunk = reqs[start:start + self.batch_size]
            gen = dict(chunk[0][1] or {})
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            visuals = [[v for v in (doc_to_visual(self.task_dict[task][split][doc_id]) or []) if v is not None]
                       for _, _, doc_to_visual, doc_id, task, split in chunk]
            texts = self._answer([c[0] for c in chunk], visuals, gen)
            for (context, *_), text in zip(chunk, texts):
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                self.cache_hook.add_partial("generate_until", (context, gen), text)
                out.append(text)
        if self.kept_tokens:
            from loguru import logger

            logger.info(f"vtc_llava: {self.pipeline}: {len(self.kept_tokens)} requests so far, "
                        f"{sum(self.kept_tokens) / len(self.kept_tokens):.1f} visual tokens per request at the LLM")
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("vtc_llava answers generation tasks (output_type: generate_until); "
                                  "this task asks for log-likelihoods")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("vtc_llava answers single-round generation tasks")
