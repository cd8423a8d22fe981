"""The lock on a bench run folder: one ``vtc bench`` process (or one sharded job) writes a folder at a time.

Two runs on one folder would both answer every question and append both answers (duplicated rows,
summaries that disagree with the report). :class:`RunLock` prevents that with a lock file,
``RUN_DIR/.vtc-lock``, that holds the owner's PID, host, start time and command line:

- On POSIX the owner also holds an ``fcntl.flock`` on the file for as long as it runs. The kernel
  releases that lock when the process ends in any way (Ctrl-C, a crash, SIGKILL), so whether the
  owner still runs is known exactly, whatever its PID or host. A second run finds the lock held and
  stops with :class:`~vtc.errors.RunLockedError` naming the owner's PID; ``force=True`` does not
  override a lock the kernel says is held (stop that process first).
- A lock file nobody holds was left by a run that ended without cleaning up (SIGKILL, power cut):
  it is stale; the next run says so (``stale`` on the lock, printed by the CLI) and takes it over.
- Where ``flock`` is not available (some network file systems, Windows) the PID decides: a lock
  whose PID no longer runs on this host is stale and taken over (and said so); a lock from a live
  PID or from another host stops the run unless ``force=True`` ("I know that run is gone").
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from vtc.errors import RunLockedError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunLock", "LOCK_FILE", "pid_alive"]

LOCK_FILE = ".vtc-lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this host (a zombie counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _describe(info: dict[str, Any]) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"PID {info.get('pid', '?')} on host {info.get('host', '?')}, started {when}"


class RunLock:
    """An exclusive lock on a run folder (see the module docstring); a context manager.

    ``stale`` is set after :meth:`acquire` when a stale lock was taken over: a sentence saying whose.
    """

    def __init__(self, run_dir: str | os.PathLike, *, force: bool = False) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_FILE
        self.force = force
        self.stale: str | None = None
        self._fd: int | None = None

    # ------------------------------------------------------------------ reading the current owner
    def owner(self) -> dict[str, Any] | None:
        """What the lock file says about its owner (None: no lock file, or an empty / damaged one)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        try:
            info = json.loads(text)
        except json.JSONDecodeError:
            return None
        return info if isinstance(info, dict) else None

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> RunLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # retried only when the file was replaced between open and lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                kernel = self._flock(fd)
                if kernel and not self._still_the_file(fd):
                    os.close(fd)  # the owner released (removed) the file meanwhile: lock the new one
                    continue
                info = self.owner()
                if info is not None and info.get("pid") != os.getpid():
                    self._take_over(info, kernel)
                self._write(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise RunLockedError(f"could not lock {self.path}: the lock file keeps changing; is another run starting?")

    def _flock(self, fd: int) -> bool:
        """Take the kernel lock; True when it is held now, False when flock is unavailable here."""
        if fcntl is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = self.owner() or {}
            raise RunLockedError(
                f"run folder {str(self.dir)!r} is in use by another vtc bench ({_describe(info)}, command: "
                f"{info.get('command', '?')}); two runs on one folder would answer every question twice. "
                "Wait for it to finish, stop it, or give this run another folder (--out DIR)."
                + (" --force does not break a lock the operating system says is still held." if self.force else "")
            ) from None
        except OSError:  # ENOLCK, EOPNOTSUPP: a file system without flock
            return False
        return True

    def _still_the_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _take_over(self, info: dict[str, Any], kernel: bool) -> None:
        pid, host = info.get("pid"), info.get("host")
        same_host = host == socket.gethostname()
        if kernel:
            why = "nothing holds it any more"
        elif same_host and isinstance(pid, int) and not pid_alive(pid):
            why = f"PID {pid} is not running"
        elif self.force:
            why = "--force"
        else:
            where = "still runs on this host" if same_host else f"runs on another host ({host})"
            raise RunLockedError(
                f"run folder {str(self.dir)!r} is locked by {_describe(info)}, which {where} as far as this "
                f"machine can tell (this file system offers no kernel lock). If that run is gone (the PID was "
                f"reused, or it ran elsewhere), pass --force to break the lock; otherwise wait for it or use --out DIR."
            )
        self.stale = f"took over the stale lock of {_describe(info)} ({why}; it ended without releasing the folder)"

    def _write(self, fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)

    def release(self) -> None:
        """Remove the lock file and let go of the folder (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            info = self.owner()
            if info is not None and info.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # closing releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
