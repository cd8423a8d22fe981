"""How a run folder's files are written and read: atomically, durably, with clear errors when damaged.

Every file ``vtc bench`` and ``vtc report`` write whole (``cells/*.json``, ``config.yaml``,
``run.json``, ``summary.jsonl``, ``report.md``, ``report.csv``, ``plots/*.png``, merged row
files) goes through :func:`atomic_open`: the content is written to a temporary file in the same
folder, flushed and ``fsync``-ed, then renamed over the target (``os.replace``, atomic on POSIX and
Windows) and the folder is ``fsync``-ed so the rename survives a power cut. A reader therefore
sees the old file or the new one, never half of one. Row files are the exception: they grow by
appending (:class:`vtc.bench.rows.RowStore`), and a line cut short by a crash is dropped on resume.

:func:`read_json` reads a JSON file written here and turns a damaged one (truncated by a disk
filling up, edited by hand) into a :class:`~vtc.errors.RunFolderError` naming the file and the
fix, instead of a raw ``JSONDecodeError``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from vtc.errors import RunFolderError

__all__ = ["atomic_open", "write_text", "write_json", "read_json", "fsync_dir"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Push a folder's entries (a rename, a new file) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # Windows: folders cannot be opened; renames there are durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, fsync: bool = True, **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``.

    ``mode`` is ``"w"`` (text, UTF-8 unless ``encoding`` is given) or ``"wb"``. If the block
    raises, the temporary file is removed and ``path`` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str, **kwargs: Any) -> None:
    """Atomically replace ``path`` with ``text``."""
    with atomic_open(path, "w", **kwargs) as fh:
        fh.write(text)


def write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> None:
    """Atomically replace ``path`` with ``obj`` as JSON (``dumps`` are :func:`json.dumps` options)."""
    write_text(path, json.dumps(obj, **dumps))


def read_json(path: str | os.PathLike, *, fix: str = "") -> Any:
    """The JSON content of ``path``; a damaged file raises :class:`RunFolderError` naming it.

    ``fix`` completes the message with what the user can do (e.g. rerun the bench to rebuild it).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunFolderError(f"{str(path)!r} does not exist{'; ' + fix if fix else ''}") from None
    except UnicodeDecodeError as e:
        raise RunFolderError(f"{str(path)!r} is damaged (not UTF-8 text: {e}){'; ' + fix if fix else ''}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        what = "empty" if not text.strip() else f"truncated or not JSON ({e})"
        raise RunFolderError(f"{str(path)!r} is damaged: {what}{'; ' + fix if fix else ''}") from None
