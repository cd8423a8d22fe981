"""vtc bench: the benchmark harness (tasks, metrics, runner, FLOPs, latency and memory, reports).

``vtc bench CONFIG.yaml`` runs a grid of model x task x pipeline x budget and writes one JSONL row
per question plus a summary per cell; ``vtc report RUN_DIR`` rebuilds the Markdown table, CSV
and plots from the rows. Modules: :mod:`~vtc.bench.tasks` and :mod:`~vtc.bench.loaders` (which
questions; :mod:`~vtc.bench.convert` writes them from the benchmarks' release files),
:mod:`~vtc.bench.metrics` and :mod:`~vtc.bench.normalize` (scores equal to each benchmark's
reference scorer), :mod:`~vtc.bench.stats` (bootstrap intervals, paired tests),
:mod:`~vtc.bench.models` (which model, which prompt format), :mod:`~vtc.bench.config` (the
grid), :mod:`~vtc.bench.runner`, :mod:`~vtc.bench.rows` (JSONL rows, resume, shard merging),
:mod:`~vtc.bench.lock` (one run per folder), :mod:`~vtc.bench.files` (atomic writes),
:mod:`~vtc.bench.trust` (what a config may run and read), :mod:`~vtc.bench.dist` (torchrun sharding),
:mod:`~vtc.bench.attach` (the seam to ``vtc.apply``), :mod:`~vtc.bench.flops`, :mod:`~vtc.bench.latency`,
:mod:`~vtc.bench.memory` (per-cell peak memory), :mod:`~vtc.bench.env`, :mod:`~vtc.bench.report` and
:mod:`~vtc.bench.plots`; :mod:`~vtc.bench.lmms` is the lmms-eval model wrapper (``vtc[lmms]``).
Importing this package is cheap: heavy dependencies (transformers, scipy, matplotlib) load inside
the functions that use them.
"""

from vtc.bench.config import BenchConfig, load_config
from vtc.bench.report import build_report
from vtc.bench.runner import run

__all__ = ["run", "load_config", "BenchConfig", "build_report"]
