"""vtc.bench.lock: one run per folder; a lock whose owner is gone is stale, detected and said so."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess

import pytest
import yaml
from conftest import tiny_config

from vtc.bench import lock as lockmod
from vtc.bench.lock import LOCK_FILE, RunLock
from vtc.bench.rows import read_rows
from vtc.cli import main
from vtc.errors import RunLockedError


def _hold(path, conn) -> None:
    with RunLock(path):
        conn.send("locked")
        conn.poll(60)  # until the test says so (or closes its end)


@pytest.fixture
def other_process(tmp_path):
    """Another process holding the lock on ``tmp_path / 'run'`` (a real second PID, forked)."""
    ctx = mp.get_context("fork")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=_hold, args=(tmp_path / "run", theirs))
    proc.start()
    assert mine.poll(30) and mine.recv() == "locked"
    yield proc
    if proc.is_alive():
        mine.send("release")
    proc.join(10)
    if proc.is_alive():
        proc.kill()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_held_lock_stops_a_second_run_naming_its_pid(tmp_path, other_process):
    with pytest.raises(RunLockedError, match=f"in use by another vtc bench \\(PID {other_process.pid} ") as e:
        RunLock(tmp_path / "run").acquire()
    assert "--out" in str(e.value)
    with pytest.raises(RunLockedError, match="does not break a lock"):  # --force never overrides a held lock
        RunLock(tmp_path / "run", force=True).acquire()


def test_a_killed_owner_leaves_a_stale_lock_that_the_next_run_takes_over(tmp_path, other_process):
    os.kill(other_process.pid, signal.SIGKILL)
    other_process.join(10)
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == other_process.pid  # left behind
    with RunLock(tmp_path / "run") as lock:
        assert lock.stale and f"stale lock of PID {other_process.pid} " in lock.stale
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released: the file is gone
    with RunLock(tmp_path / "run") as again:
        assert again.stale is None


def test_without_kernel_locks_the_pid_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(lockmod, "fcntl", None)  # a file system without flock
    path = tmp_path / LOCK_FILE
    here = socket.gethostname()

    def left_by(pid, host=here):
        path.write_text(json.dumps({"pid": pid, "host": host, "started": 0, "command": "vtc bench x.yaml"}))

    dead = _dead_pid()
    left_by(dead)
    with RunLock(tmp_path) as lock:  # the PID is gone: stale, taken over, said so
        assert f"PID {dead} is not running" in lock.stale
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        left_by(sleeper.pid)
        with pytest.raises(RunLockedError, match=f"PID {sleeper.pid} .*still runs on this host.*--force"):
            RunLock(tmp_path).acquire()
        left_by(4242, host="elsewhere")
        with pytest.raises(RunLockedError, match="another host"):
            RunLock(tmp_path).acquire()
        with RunLock(tmp_path, force=True) as lock:
            assert "--force" in lock.stale
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_cli_refuses_a_locked_folder_and_takes_over_a_stale_one(tmp_path, jsonl_task, other_process, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(jsonl_task, tmp_path / "run", pipelines=[], limit=4)))
    assert main(["bench", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"PID {other_process.pid} " in err and "in use by another vtc bench" in err
    assert not (tmp_path / "run" / "rows").exists()  # nothing ran
    os.kill(other_process.pid, signal.SIGKILL)  # the first run dies without releasing the folder
    other_process.join(10)
    assert main(["bench", str(cfg), "--no-progress"]) == 0
    assert f"stale lock of PID {other_process.pid} " in capsys.readouterr().err
    (rows_file,) = (tmp_path / "run" / "rows").iterdir()
    assert [r["qid"] for r in read_rows(rows_file)] == ["q0", "q1", "q_broken", "q2"]  # once each
    (cell,) = (tmp_path / "run" / "cells").iterdir()
    summary = json.loads((tmp_path / "run" / "summary.jsonl").read_text())
    assert json.loads(cell.read_text())["summary"]["answered"] == summary["answered"] == 3
