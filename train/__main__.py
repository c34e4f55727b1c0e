"""``python -m train CONFIG.yaml [key=value ...] [--export-hf DIR] [--json]``.

Trains as the YAML config says, with dotted overrides (``steps=60 out=/tmp/run
schedule.peak_lr=1e-3 data.sources.replay.weight=0.05``). Re-running the same command resumes
from the latest checkpoint in ``OUT/checkpoints``. The same program is ``jaxarith train``.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. steps=60 out=DIR schedule.peak_lr=1e-3")
    p.add_argument("--export-hf", metavar="DIR", default=None,
                   help="at the end, write the final weights as an HF model (export.hf_dir)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON summary object on stdout (no progress bar)")


def handle(args) -> int:
    """Load the config, run, print the summary."""
    from train.config import load_config
    from train.loop import run

    overrides = list(args.overrides)
    if args.export_hf:
        overrides.append(f"export.hf_dir={args.export_hf}")
    if args.json:
        overrides.append("log.progress=false")
    cfg = load_config(args.config, overrides)
    summary = run(cfg)
    summary.pop("batches", None)
    summary.pop("state", None)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        loss = summary.get("loss")
        print(f"{summary['status']} at step {summary['step']}: loss "
              f"{'n/a' if loss is None else f'{loss:.4f}'}; outputs in {summary['out']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    args.command = "train"
    args.handler = handle
    from jaxarith.commands import _common

    return _common.run(args)


if __name__ == "__main__":
    sys.exit(main())
