"""vtc.bench sharding: two CPU processes on gloo split the questions and rank 0 merges the rows."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback

from conftest import tiny_config

from vtc.bench.rows import read_rows

ORDER = ["q0", "q1", "q_broken", "q2", "line5", "q3", "q4", "q5", "q_noanswer"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, errors) -> None:
    try:
        import torch

        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        from vtc.bench.config import load_config
        from vtc.bench.runner import run

        run(load_config(cfg), progress=False)
    except BaseException:  # noqa: BLE001 - report to the parent
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def _launch(cfg: dict, world: int = 2) -> None:
    ctx = mp.get_context("fork")  # children inherit the imported libraries and the cached tiny model
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    for p in procs:
        if p.is_alive():
            p.kill()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert all(p.exitcode == 0 for p in procs), "\n".join(msgs) or [p.exitcode for p in procs]


def test_two_processes_on_gloo(tmp_path, jsonl_task):
    from vtc.bench.models import load_model, model_entry

    load_model(model_entry({"name": "tiny", "source": "random-llava", "device": "cpu"}))  # build once, before fork
    import matplotlib.pyplot  # noqa: F401  (imported once, before fork)
    out = tmp_path / "run"
    cfg = tiny_config(jsonl_task, out, batch_size=2)
    _launch(cfg)
    files = sorted((out / "rows").iterdir())
    assert len(files) == 2 and not any(".rank" in f.name for f in files)  # shards merged and removed
    for f in files:
        rows = read_rows(f)
        assert [r["qid"] for r in rows] == ORDER  # every question once, in question order
        # process r answered questions r, r + 2, ... of the list
        assert [r["rank"] for r in rows] == [i % 2 for i in range(len(ORDER))]
    assert (out / "report.md").is_file() and len(list((out / "cells").glob("*.json"))) == 2
    before = [f.read_text() for f in files]
    _launch(cfg)  # a sharded rerun resumes: nothing new is written
    assert [f.read_text() for f in sorted((out / "rows").iterdir())] == before
