"""The ``vtc`` command line: ``vtc bench CONFIG.yaml`` runs a benchmark grid, ``vtc report RUN_DIR`` rebuilds its report.

``vtc convert FORMAT --out FILE.jsonl ...`` turns a VQA benchmark's release files into a vtc task file.

Run under ``torchrun --nproc-per-node N -m vtc.cli bench CONFIG.yaml`` (or ``accelerate launch``)
to shard the questions across processes. Errors a user can cause print one line and exit with
status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vtc", description="visual-token compression for LLaVA-style models")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run a benchmark config (model x task x pipeline x budget)")
    b.add_argument("config", help="bench config YAML (see eval/configs/), or the name of a shipped config: quick, "
                                  "ablation, tiny_quality, llava15_7b, llava_next_7b")
    b.add_argument("--out", default=None, help="run folder (default: the config's output, else runs/NAME)")
    b.add_argument("--limit", type=int, default=None, help="questions per task (overrides the config)")
    b.add_argument("--stratify", choices=["qtype", "answer"], default=None,
                   help="pick --limit questions stratified by question type or answer")
    b.add_argument("--batch-size", type=int, default=None, help="questions per generate call")
    b.add_argument("--no-latency", action="store_true", help="skip the per-cell latency/memory profile")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    b.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    b.add_argument("--keep-errors", action="store_true",
                   help="on resume, count error rows as answered (default: ask their questions again)")
    b.add_argument("--force", action="store_true",
                   help="break the run folder's lock when this machine cannot confirm its owner still runs "
                        "(another host, a reused PID); a lock the OS says is held is never broken")
    b.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="allow and import a plugin module (repeatable): it may register metrics, operators, loaders "
                        "and model sources, and the config may name its functions as MODULE:function. "
                        "This runs the module's code")
    b.add_argument("--trust-remote-code", action="store_true",
                   help="allow trust_remote_code in a model's options (runs Python files shipped with a checkpoint)")
    b.add_argument("--allow-absolute-paths", action="store_true",
                   help="let task image paths point outside the task file's folder")
    c = sub.add_parser("convert", help="convert a VQA benchmark's release files to vtc JSONL (see vtc.bench.convert)")
    c.add_argument("format", choices=["vqav2", "gqa", "textvqa", "pope", "scienceqa", "mme", "mmbench", "seed", "mmstar",
                                      "ocrbench", "vizwiz"])
    c.add_argument("--out", required=True, help="output .jsonl (image paths are written relative to it)")
    c.add_argument("--questions", nargs="*", default=[], help="the benchmark's question file(s)")
    c.add_argument("--annotations", default=None, help="vqav2: the annotations file")
    c.add_argument("--images", default=".", help="the image folder (mme: the benchmark's root folder; mmbench, mmstar: "
                   "where to decode the embedded images, default <out>_images/)")
    c.add_argument("--split", default="test", help="scienceqa: which split")
    c.add_argument("--no-circular", action="store_true", help="mmbench: the original option order only (no CircularEval)")
    c.add_argument("--skip-missing", action="store_true", help="drop questions whose image is not under --images")
    r = sub.add_parser("report", help="rebuild report.md, report.csv and plots of a run from its rows")
    r.add_argument("run_dir")
    r.add_argument("--no-plots", action="store_true")
    return p


class _Stderr(logging.Handler):
    """Prints vtc's warnings (a stale lock taken over, a damaged file rebuilt) on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = logging.getLogger("vtc")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        log.addHandler(_Stderr(logging.WARNING))
    args = _parser().parse_args(argv)
    from vtc.errors import ConfigError, VtcError

    try:
        if args.command == "bench":
            if args.threads is not None:
                if args.threads < 1:
                    raise ConfigError(f"--threads must be >= 1, got {args.threads}")
                import torch

                torch.set_num_threads(args.threads)
            from vtc.bench.runner import run

            out = run(args.config, progress=not args.no_progress, keep_errors=args.keep_errors, force=args.force,
                      output=args.out, limit=args.limit, stratify=args.stratify, batch_size=args.batch_size,
                      latency=False if args.no_latency else None, plugins=args.plugin,
                      trust_remote_code=args.trust_remote_code, allow_absolute_paths=args.allow_absolute_paths)
            if int(os.environ.get("RANK", "0")) == 0:
                print((out / "report.md").read_text())
                print(f"rows, summaries, report and plots in {out}")
        elif args.command == "convert":
            from vtc.bench.convert import convert

            n = convert(args.format, args.out, questions=args.questions, images=args.images,
                        annotations=args.annotations, split=args.split, circular=not args.no_circular,
                        skip_missing=args.skip_missing)
            print(f"wrote {n} questions to {args.out}")
        elif args.command == "report":
            from vtc.bench.report import build_report

            build_report(args.run_dir, plots=not args.no_plots)
            print(open(os.path.join(args.run_dir, "report.md")).read())
    except VtcError as e:
        print(f"vtc {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
