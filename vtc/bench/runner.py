"""The bench runner: answers every question of every cell and writes one row per question.

``run(config)`` walks the grid of :mod:`vtc.bench.config` (per model, per task: the uncompressed
baseline first, then each pipeline at each budget). First it locks the run folder
(:mod:`vtc.bench.lock`: a second run on the same folder stops at once, naming the first's PID) and
runs a **pre-flight**: every cell's pipeline (the baseline included) generates one token for one
real question on its model, so a pipeline that cannot run on a model's inputs (``m3:keep=25`` on a
24x24 grid) stops the run before any cell, with a message naming the cell. Then for each cell it

1. skips the questions whose rows are already on disk (resume) — error rows are dropped and
   asked again unless ``keep_errors`` (``--keep-errors``) — and shards the rest across
   processes when launched by ``torchrun`` / ``accelerate launch``;
2. answers them in batches with greedy ``generate``, under the pipeline attached by
   :func:`vtc.bench.attach.attached`, and appends each batch's rows to the cell's JSONL file
   (flushed before the next batch starts, so Ctrl-C or a crash loses at most the batch in
   flight); an unreadable image, a malformed source record or a question that fails on its own
   becomes an error row and the run goes on;
3. on rank 0: merges the shards, profiles latency and memory on the first questions
   (:mod:`vtc.bench.latency`) and writes the cell's summary to ``cells/<cell id>.json``
   (atomically, :mod:`vtc.bench.files`; a damaged one from an earlier run is rebuilt from the rows).

At the end rank 0 writes the report (:mod:`vtc.bench.report`). A row holds the prediction, its
score, the visual tokens before and after compression, the text and generated token counts, the
batch's wall time (and the per-question share), the analytic FLOPs per stage
(:mod:`vtc.bench.flops`; with in-LLM operators each decoder layer counted at the visual tokens the
integration measured it processing, and the layer-average "equivalent tokens"), the cell hash and
the environment (device, dtype, attention, versions).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vtc.bench import dist
from vtc.bench.attach import Attachment, PromptCounter, attached
from vtc.bench.config import BenchConfig, Cell, load_config
from vtc.bench.env import environment
from vtc.bench.files import read_json, write_json, write_text
from vtc.bench.flops import ModelShape, estimate
from vtc.bench.latency import profile
from vtc.bench.loaders import Question
from vtc.bench.lock import RunLock
from vtc.bench.memory import CellMemory
from vtc.bench.metrics import get_metric, question_fields
from vtc.bench.models import clear_cache, load_model
from vtc.bench.rows import RowStore, cell_rows
from vtc.bench.tasks import Task, select
from vtc.errors import ConfigError, InputError, RunFolderError, RunLockedError, VtcError

__all__ = ["run", "Runner", "BatchHook"]

log = logging.getLogger("vtc.bench")

#: called after each batch's rows are on disk: ``hook(cell, batch_index, rows)``
BatchHook = Callable[[Cell, int, list[dict[str, Any]]], None]


def run(config: BenchConfig | str | Path, *, on_batch: BatchHook | None = None, progress: bool = True,
        keep_errors: bool = False, force: bool = False, **overrides: Any) -> Path:
    """Run a bench config (a path or a parsed :class:`BenchConfig`); returns the run folder.

    ``keep_errors``: error rows on disk count as answered (default: asked again). ``force``: break
    a lock the operating system cannot confirm is held (see :mod:`vtc.bench.lock`). ``overrides``
    go to :func:`~vtc.bench.config.load_config` (the CLI flags)."""
    cfg = config if isinstance(config, BenchConfig) else load_config(config, **overrides)
    return Runner(cfg, on_batch=on_batch, progress=progress, keep_errors=keep_errors, force=force).run()


class _ModelState:
    def __init__(self, model: Any, processor: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.processor, self.device, self.dtype = model, processor, device, dtype
        self.shape = ModelShape.from_config(model.config)
        self.env = environment(model, device, dtype)
        cfg = model.config
        self.image_token = getattr(cfg, "image_token_id", None)
        if self.image_token is None:
            self.image_token = getattr(cfg, "image_token_index", None)
        tok = getattr(processor, "tokenizer", processor)
        self.eos = getattr(model.generation_config, "eos_token_id", None) or getattr(tok, "eos_token_id", None)
        if isinstance(self.eos, int):
            self.eos = [self.eos]


class Runner:
    """Runs one :class:`BenchConfig` (see the module docstring)."""

    #: consecutive questions failing in generate (not in loading) before the run stops
    max_consecutive_failures: int = 16

    def __init__(self, config: BenchConfig, *, on_batch: BatchHook | None = None, progress: bool = True,
                 keep_errors: bool = False, force: bool = False) -> None:
        self.config = config
        self.on_batch = on_batch
        self.progress = progress
        self.keep_errors = keep_errors
        self.force = force
        self.dir = Path(config.output)
        self._questions: dict[str, list[Question]] = {}
        self._cells: list[Cell] = []
        self._failures = 0

    # ------------------------------------------------------------------ top level
    def run(self) -> Path:
        ctx = dist.context()
        lock = None
        try:
            cells = self._cells = self.config.cells()
            for cell in cells:  # a missing task file or a refused path fails now, before the folder is touched
                self.questions(cell.task, cell.selection)
            lock = self._lock(ctx)
            self._run(ctx, cells)
        finally:
            if lock is not None:
                lock.release()
            ctx.close()
        return self.dir

    def _lock(self, ctx: dist.DistContext) -> RunLock | None:
        """Rank 0 locks the run folder; every rank learns whether it could."""
        lock, err = None, None
        if ctx.main:
            try:
                lock = RunLock(self.dir, force=self.force).acquire()
            except RunLockedError as e:
                err = e
        if not ctx.agree(err is None):
            raise err or RunLockedError(f"rank 0 could not lock the run folder {str(self.dir)!r} (see its message)")
        if lock is not None and lock.stale:
            log.warning("vtc bench: %s", lock.stale)
        return lock

    def _run(self, ctx: dist.DistContext, cells: list[Cell]) -> None:
        if ctx.main:
            (self.dir / "cells").mkdir(parents=True, exist_ok=True)
            import yaml

            write_text(self.dir / "config.yaml", yaml.safe_dump(self.config.source, sort_keys=False))
            write_json(self.dir / "run.json", {"name": self.config.name, "cells": [c.id for c in cells]}, indent=1)
        ctx.barrier()
        states = self._preflight(cells, ctx)
        for cell in cells:
            if cell.model.name not in states:
                states.clear()  # one model in memory at a time
                clear_cache()
                states[cell.model.name] = self._load(cell, ctx)
            self.run_cell(cell, states[cell.model.name], ctx)
        if ctx.main:
            from vtc.bench.report import build_report

            build_report(self.dir)

    def _preflight(self, cells: list[Cell], ctx: dist.DistContext) -> dict[str, _ModelState]:
        """Run every cell's pipeline once on a real question of its model, before any cell.

        Models load one at a time, the run's first model last, so it stays loaded for the first
        cell. Returns ``{model name: state}`` of the model left loaded."""
        by_model: dict[str, list[Cell]] = {}
        for cell in cells:
            by_model.setdefault(cell.model.name, []).append(cell)
        states: dict[str, _ModelState] = {}
        for name in reversed(list(by_model)):
            states.clear()
            clear_cache()
            state = states[name] = self._load(by_model[name][0], ctx)
            for cell in by_model[name]:
                self._preflight_cell(cell, state)
        return states

    def _preflight_cell(self, cell: Cell, state: _ModelState) -> None:
        picked = None
        for q in self.questions(cell.task, cell.selection):
            if q.error:
                continue
            try:
                picked = (q, q.load_image())
                break
            except InputError:
                continue
        pipeline = cell.pipeline()
        where = f"{cell.model.name} / {cell.task.name} / {cell.label}"
        try:
            with attached(state.model, pipeline, **cell.apply_options):
                if picked is None:  # no readable question: attaching is all that can be checked
                    return
                inputs = self._inputs(cell, [picked[0]], [picked[1]], state)
                with torch.inference_mode():
                    state.model.generate(**inputs, max_new_tokens=1, do_sample=False, num_beams=1)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure here is the pipeline's or the model's
            what = "the uncompressed model" if pipeline is None else f"pipeline {str(pipeline)!r}"
            qid = picked[0].qid if picked is not None else "?"
            raise ConfigError(
                f"pre-flight failed: {what} on {where} (question {qid!r}): {type(e).__name__}: {e}. "
                "No cell has run. Every pipeline runs once on a real question of each model before the first cell; "
                "fix or remove this one and rerun.") from e

    def _device(self, cell: Cell, ctx: dist.DistContext) -> torch.device:
        return cell.model.resolved_device(ctx.local_rank)

    def _load(self, cell: Cell, ctx: dist.DistContext) -> _ModelState:
        device = self._device(cell, ctx)
        model, processor = load_model(cell.model, device)
        return _ModelState(model, processor, device, cell.model.torch_dtype)

    def questions(self, task: Task, selection: dict[str, Any]) -> list[Question]:
        key = f"{task.hash}:{json.dumps(selection, sort_keys=True)}"
        if key not in self._questions:
            self._questions[key] = select(task.questions(), **selection)
        return self._questions[key]

    # ------------------------------------------------------------------ one cell
    def run_cell(self, cell: Cell, state: _ModelState, ctx: dist.DistContext) -> None:
        qs = self.questions(cell.task, cell.selection)
        store = RowStore(self.dir, cell.id, ctx.rank, ctx.world)
        mine = dist.shard(qs, ctx.rank, ctx.world)
        store.prepare(keep_errors=self.keep_errors, main=ctx.main)  # torn lines dropped; error rows asked again
        ctx.barrier()
        done = store.done()
        todo = [q for q in mine if q.qid not in done]
        pipeline = cell.pipeline()
        bs = self.config.batch_size
        bar = None
        if self.progress and ctx.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"{cell.model.name} {cell.task.name} {cell.label}",
                       unit="q", dynamic_ncols=True)
        memory = CellMemory(state.device)
        try:
            with memory, attached(state.model, pipeline, **cell.apply_options) as att, PromptCounter(state.model) as counter:
                for bi, start in enumerate(range(0, len(todo), bs)):
                    batch = todo[start:start + bs]
                    rows = self.answer(cell, batch, state, att, counter, pipeline)
                    for r in rows:
                        r["rank"] = ctx.rank
                    store.append(rows)
                    if bar is not None:
                        bar.update(len(batch))
                    if self.on_batch is not None:
                        self.on_batch(cell, bi, rows)
        finally:
            if bar is not None:
                bar.close()
        ctx.barrier()
        if ctx.main:
            rows = store.merge([q.qid for q in qs])  # shards folded in; one row per question, question order
            self._finish_cell(cell, rows, qs, state, pipeline, memory.result() if todo else None)
        ctx.barrier()

    def _finish_cell(self, cell: Cell, rows: list[dict[str, Any]], qs: list[Question], state: _ModelState,
                     pipeline: Any, memory: dict[str, Any] | None = None) -> None:
        from vtc.bench.report import summarize_cell

        meta_path = self.dir / "cells" / f"{cell.id}.json"
        old: dict[str, Any] = {}
        if meta_path.is_file():
            try:
                old = read_json(meta_path)
            except RunFolderError as e:
                log.warning("vtc bench: %s; rebuilding it from the rows (its latency profile is measured again)", e)
            old = old if isinstance(old, dict) else {}
        latency = old.get("latency") if old.get("hash") == cell.hash else None
        if latency is None and self.config.latency.enabled:
            latency = self._latency(cell, qs, state, pipeline)
        meta = {
            "id": cell.id, "hash": cell.hash, "model": cell.model.name, "task": cell.task.name, "method": cell.method,
            "budget": cell.budget, "metric": cell.task.metric, "pipeline": None if pipeline is None else str(pipeline),
            "spec": cell.spec(), "env": state.env, "latency": latency, "questions": len(qs),
            "memory": memory or (old.get("memory") if old.get("hash") == cell.hash else None),
        }
        base = None
        if not cell.is_baseline:
            base_cells = [c for c in self._cells if c.is_baseline and c.model.name == cell.model.name
                          and c.task.name == cell.task.name]
            if base_cells:
                base = cell_rows(self.dir, base_cells[0].id)
        meta["summary"] = summarize_cell(meta, rows, base)
        write_json(meta_path, meta, indent=1, default=str)

    def _latency(self, cell: Cell, qs: list[Question], state: _ModelState, pipeline: Any) -> dict[str, Any] | None:
        images, picked = [], []
        for q in qs:
            if len(picked) == self.config.latency.batch:
                break
            if q.error:
                continue
            try:
                images.append(q.load_image())
                picked.append(q)
            except InputError:
                continue
        if not picked:
            return None
        inputs = self._inputs(cell, picked, images, state)
        with attached(state.model, pipeline, **cell.apply_options) as att:
            out = profile(state.model, inputs, self.config.latency, pipeline=pipeline if att.applied else None)
        out["applied"] = att.applied
        return out

    # ------------------------------------------------------------------ one batch
    def _base_row(self, cell: Cell, q: Question, att: Attachment, state: _ModelState) -> dict[str, Any]:
        return {
            "qid": q.qid, "cell": cell.id, "hash": cell.hash, "model": cell.model.name, "task": cell.task.name,
            "method": cell.method, "budget": cell.budget, "pipeline": None if att.pipeline is None else str(att.pipeline),
            "applied": att.applied, "question": q.question, "answers": q.answers, "qtype": q.qtype,
            "prediction": None, "score": None, "error": None, "env": state.env, **question_fields(q, cell.task.metric),
        }

    def _inputs(self, cell: Cell, qs: Sequence[Question], images: list[Any], state: _ModelState) -> dict[str, Any]:
        prompts = [cell.model.format(cell.task.format_prompt(q.question), state.processor) for q in qs]
        inputs = state.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        out = {}
        for k, v in inputs.items():
            if torch.is_tensor(v):
                v = v.to(state.device)
                if v.is_floating_point():
                    v = v.to(state.dtype)
            out[k] = v
        return out

    def answer(self, cell: Cell, batch: Sequence[Question], state: _ModelState, att: Attachment,
               counter: PromptCounter, pipeline: Any) -> list[dict[str, Any]]:
        """Rows for one batch of questions (error rows included), in the batch's order."""
        rows = {q.qid: self._base_row(cell, q, att, state) for q in batch}
        good: list[tuple[Question, Any]] = []
        for q in batch:
            if q.error:
                rows[q.qid]["error"] = f"malformed question: {q.error}"
                continue
            try:
                good.append((q, q.load_image()))
            except InputError as e:
                rows[q.qid]["error"] = f"unreadable image: {e}"
        self._generate(cell, good, rows, state, att, counter, pipeline)
        return [rows[q.qid] for q in batch]

    def _generate(self, cell: Cell, good: list[tuple[Question, Any]], rows: dict[str, dict[str, Any]],
                  state: _ModelState, att: Attachment, counter: PromptCounter, pipeline: Any) -> None:
        if not good:
            return
        try:
            self._generate_batch(cell, good, rows, state, att, counter, pipeline)
            self._failures = 0
        except torch.cuda.OutOfMemoryError:
            raise  # lower batch_size; not a property of the question
        except Exception as e:  # noqa: BLE001 - isolate the question at fault, keep the run going
            if len(good) > 1:  # find the question at fault: answer one at a time
                for item in good:
                    self._generate(cell, [item], rows, state, att, counter, pipeline)
                return
            rows[good[0][0].qid]["error"] = f"generation failed: {type(e).__name__}: {e}"
            self._failures += 1
            if self._failures >= self.max_consecutive_failures:
                raise VtcError(
                    f"cell {cell.label}: generation failed on {self._failures} questions in a row "
                    f"(last: {type(e).__name__}: {e}); this looks like a problem with the model or pipeline, "
                    "not with single questions. Rows so far are saved; fix it and rerun to resume."
                ) from e

    @torch.inference_mode()
    def _generate_batch(self, cell: Cell, good: list[tuple[Question, Any]], rows: dict[str, dict[str, Any]],
                        state: _ModelState, att: Attachment, counter: PromptCounter, pipeline: Any) -> None:
        qs = [q for q, _ in good]
        inputs = self._inputs(cell, qs, [im for _, im in good], state)
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        is_img = ids == state.image_token
        visual = is_img.sum(1).tolist()
        text = ((~is_img) & mask.bool()).sum(1).tolist()
        grids = self._grids(inputs, state)
        counter.reset()
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)
        t0 = time.perf_counter()
        out = state.model.generate(**inputs, max_new_tokens=cell.task.max_new_tokens, do_sample=False, num_beams=1)
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)
        wall = time.perf_counter() - t0
        new = out[:, ids.shape[1]:]
        preds = state.processor.batch_decode(new, skip_special_tokens=True)
        n_new = self._generated_lengths(new, state)
        kept = att.kept_tokens() if att.applied else None
        layer_visual = att.layer_visual() if att.applied else None
        if layer_visual is not None and len(layer_visual) != len(qs):
            layer_visual = None
        if kept is None or len(kept) != len(qs):
            lengths = counter.lengths or [int(v) for v in mask.sum(1).tolist()]
            kept = [int(lengths[i]) - int(text[i]) for i in range(len(qs))]
        metric = get_metric(cell.task.metric)
        use_pipe = pipeline if att.applied else None
        for i, q in enumerate(qs):
            row = rows[q.qid]
            pred = preds[i].strip()
            row.update(prediction=pred, visual_tokens=int(visual[i]), kept_tokens=int(kept[i]), text_tokens=int(text[i]),
                       new_tokens=int(n_new[i]), passes=len(grids[i]), time_s=wall / len(qs), batch_time_s=wall,
                       batch_size=len(qs))
            try:
                row["score"] = metric.score_question(pred, q.answers, q.meta) if q.answers else None
            except VtcError as e:
                row["error"] = f"cannot score: {e}"
            vis_in = None if use_pipe is None or use_pipe.has_stage("vision") else int(visual[i])
            row["flops"] = estimate(state.shape, text_tokens=int(text[i]), kept_tokens=int(kept[i]),
                                    new_tokens=int(n_new[i]), grids=grids[i], pipeline=use_pipe,
                                    visual_tokens=vis_in, dtype_bytes=torch.finfo(state.dtype).bits // 8,
                                    layer_visual=None if layer_visual is None else layer_visual[i])

    def _grids(self, inputs: dict[str, Any], state: _ModelState) -> list[list[tuple[int, int]]]:
        """Per question, the patch grid of each vision-tower pass (the model's adapter knows them)."""
        from vtc.integrations.adapters import adapter_for

        return adapter_for(state.model).tower_grids(inputs)

    def _generated_lengths(self, new: torch.Tensor, state: _ModelState) -> list[int]:
        if not state.eos:
            return [new.shape[1]] * new.shape[0]
        is_eos = torch.isin(new, torch.tensor(state.eos, device=new.device))
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], new.shape[1], dtype=torch.long))
        return [int(v) for v in first.tolist()]
