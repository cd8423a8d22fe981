"""The JSONL row files of a run: one row per question, appended and flushed as the run goes.

A cell's rows live in ``RUN_DIR/rows/<cell id>.jsonl``. Under sharding each process appends to
its own ``<cell id>.rank<r>.jsonl`` and rank 0 merges them into the cell's file (question order,
one row per question id) once every process is done.

Crashes and resume. Each batch's rows are appended with one ``write`` and ``fsync``-ed before the
next batch starts. A process killed mid-write (SIGKILL, power cut, a full disk) can leave a last
line cut short; :meth:`RowStore.prepare` (called when a cell starts) finds every line that is not
a complete JSON row, drops it and rewrites the file atomically, so the question it held is simply
asked again: a crash loses at most the batch in flight, never a complete row, and never glues a
new row onto half of an old one. Readers (:func:`read_rows`, reports) skip such lines too.
Unless ``keep_errors``, :meth:`RowStore.prepare` also drops error rows, so their questions are
asked again (after a missing image is restored, say). :meth:`RowStore.done` then lists the
question ids already answered. A file therefore never holds two rows of one question;
:func:`cell_rows`, which summaries and reports read, keeps the first row of a question should one
ever appear twice.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vtc.bench.files import atomic_open

__all__ = ["RowStore", "read_rows", "write_rows", "cell_rows"]


def _parse(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and "qid" in row else None


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every complete row of a JSONL file (a cut-short or garbled line is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            row = _parse(line)
            if row is not None:
                out.append(row)
    return out


def _clean(obj: Any) -> Any:
    """NaN/inf to None so every row is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _dumps(row: dict[str, Any]) -> str:
    return json.dumps(_clean(row), ensure_ascii=False, separators=(",", ":"))


def write_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Atomically replace ``path`` with ``rows`` (:func:`vtc.bench.files.atomic_open`)."""
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(_dumps(row) + "\n")


def cell_rows(run_dir: str | Path, cell_id: str) -> list[dict[str, Any]]:
    """A cell's rows as summaries and reports read them: its merged file, then any shards, one row
    per question (the first written wins)."""
    rows_dir = Path(run_dir) / "rows"
    by_id: dict[str, dict[str, Any]] = {}
    for path in [rows_dir / f"{cell_id}.jsonl", *sorted(rows_dir.glob(f"{cell_id}.rank*.jsonl"))]:
        for row in read_rows(path):
            by_id.setdefault(row["qid"], row)
    return list(by_id.values())


class RowStore:
    """Rows of one cell for one process (see the module docstring)."""

    def __init__(self, run_dir: str | Path, cell_id: str, rank: int = 0, world: int = 1) -> None:
        self.dir = Path(run_dir) / "rows"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cell_id, self.rank, self.world = cell_id, rank, world
        self.path = self.dir / f"{cell_id}.jsonl"
        self.own = self.dir / f"{cell_id}.rank{rank}.jsonl" if world > 1 else self.path

    def _repair(self, path: Path) -> list[dict[str, Any]]:
        """Rows of ``path``; rewrites the file when a line is cut short or garbled."""
        if not path.is_file():
            return []
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        rows = [r for r in (_parse(line) for line in lines) if r is not None]
        if len(rows) != len([line for line in lines if line.strip()]) or (text and not text.endswith("\n")):
            write_rows(path, rows)
        return rows

    def prepare(self, keep_errors: bool = False, main: bool = True) -> None:
        """Before a cell runs: drop cut-short lines (and, unless ``keep_errors``, error rows) from this
        process's file, and from the merged file on the ``main`` process (see the module docstring)."""
        paths = [self.own] + ([self.path] if main and self.path != self.own else [])
        for path in paths:
            rows = self._repair(path)
            if not keep_errors and any(r.get("error") for r in rows):
                write_rows(path, [r for r in rows if not r.get("error")])

    def done(self) -> set[str]:
        """Question ids already written for this cell (merged file and this process's shard)."""
        ids = {r["qid"] for r in read_rows(self.path)} if self.own != self.path else set()
        ids |= {r["qid"] for r in self._repair(self.own)}
        return ids

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append rows and push them to disk before returning."""
        if not rows:
            return
        with self.own.open("a", encoding="utf-8") as fh:
            fh.write("".join(_dumps(r) + "\n" for r in rows))
            fh.flush()
            os.fsync(fh.fileno())

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob(f"{self.cell_id}.rank*.jsonl"))

    def merge(self, order: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Fold every shard into the cell's file (one row per question, in ``order``); returns the rows."""
        by_id: dict[str, dict[str, Any]] = {}
        for path in [self.path, *self.shards()]:
            for row in read_rows(path):
                by_id.setdefault(row["qid"], row)
        if order is not None:
            pos = {q: i for i, q in enumerate(order)}
            rows = sorted(by_id.values(), key=lambda r: (pos.get(r["qid"], len(pos)), r["qid"]))
        else:
            rows = list(by_id.values())
        write_rows(self.path, rows)
        for path in self.shards():
            path.unlink()
        return rows

    def rows(self) -> list[dict[str, Any]]:
        return read_rows(self.path)
