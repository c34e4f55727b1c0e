"""``python -m train CONFIG.yaml [key=value ...] [--export-hf DIR] [--json]``.

Trains as the YAML config says, with dotted overrides (``steps=60 out=/tmp/run
schedule.peak_lr=1e-3 data.sources.replay.weight=0.05``). Re-running the same command resumes
from the latest checkpoint in ``OUT/checkpoints``; re-running a finished run reports it and
changes nothing. The same program is ``jaxarith train``. Exit codes: see :mod:`train`
(0 done, 2 error, 75 preempted by SIGTERM: resume later, 130 Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxarith import cli, distributed
from jaxarith.commands import _common
from jaxarith.distributed import add_arguments as add_distributed
from jaxarith.errors import ConfigError
from train import EXIT_INTERRUPTED, EXIT_PREEMPTED
from train.commands import plan as plan_cmd
from train.config import load_train_config
from train.loop import run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. steps=60 out=DIR schedule.peak_lr=1e-3")
    p.add_argument("--export-hf", metavar="DIR", default=None,
                   help="at the end, write the final weights as an HF model (export.hf_dir)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON summary object on stdout (no progress bar)")
    p.add_argument("--compile-only", action="store_true",
                   help="compile the step for --topology and report per-chip HBM, do not train "
                        "(= jaxarith plan)")
    plan_cmd.add_plan_arguments(p, required=False)
    p.add_argument("--allow-config-change", metavar="KEY[,KEY]", default="",
                   help="resume although these config keys (or sections, e.g. data.sources.code) "
                        "differ from the run's saved config (default: such a resume is refused)")
    add_distributed(p)
    _common.add_allow_nonfinite(p)


def handle(args) -> int:
    """Load the config, run, print the summary; the exit code says how the run ended."""
    overrides = list(args.overrides)
    if args.export_hf:
        overrides.append(f"export.hf_dir={args.export_hf}")
    if args.json:
        overrides.append("log.progress=false")
    if args.compile_only or args.topology:
        if not (args.compile_only and args.topology):
            raise ConfigError("--compile-only and --topology go together (compile for a TPU "
                              "slice without training)")
        return plan_cmd.handle(args)
    cfg = load_train_config(args.config, overrides)
    if cfg.distributed:  # the config's `distributed: true`: auto-detect, before any JAX call

        if distributed.initialize(distributed.config_from_args(args, auto=True)):
            distributed.quiet_secondary()
    try:
        allow = [k.strip() for k in args.allow_config_change.split(",") if k.strip()]
        summary = run(cfg, allow_config_change=allow)
    except KeyboardInterrupt:  # Ctrl-C before or after the training steps
        return _interrupted(args, None)
    summary.pop("batches", None)
    summary.pop("state", None)
    if summary["status"] == "interrupted":
        return _interrupted(args, summary)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        loss = summary.get("loss")
        what = "already done" if summary.get("already_done") else summary["status"]
        print(f"{what} at step {summary['step']}: loss "
              f"{'n/a' if loss is None else f'{loss:.4f}'}; outputs in {summary['out']}")
        if summary["status"] == "preempted":
            print(f"stopped by SIGTERM with a checkpoint at step {summary['step']}: run the same "
                  f"command to resume (exit code {EXIT_PREEMPTED})", file=sys.stderr)
    return EXIT_PREEMPTED if summary["status"] == "preempted" else 0 if \
        summary["status"] == "done" else EXIT_INTERRUPTED


def _interrupted(args, summary: dict | None) -> int:
    msg = "interrupted (Ctrl-C)"
    if summary is not None:
        msg += (f" at step {summary['step']}; a checkpoint is saved: run the same command to "
                "resume")
    if args.json:
        print(json.dumps({"error": msg, "type": "KeyboardInterrupt",
                          **({} if summary is None else {"step": summary["step"],
                                                         "status": summary["status"]})}))
    else:
        print(f"jaxarith train: {msg}", file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.captureWarnings(True)  # library warnings go through logging (and the progress bar)
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = cli.parse_with_overrides(p, argv)
    args.command = "train"
    args.handler = handle

    try:
        return _common.run(args)
    except KeyboardInterrupt:
        return _interrupted(args, None)


if __name__ == "__main__":
    sys.exit(main())
