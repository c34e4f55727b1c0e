"""The embedded default job (``make demo``): the delta-transplant experiment on the bundled data.

    python -m train.demo [--out DIR] [--json]

Runs ``jaxarith experiment delta-transplant`` with its embedded default (a tiny Llama, the bundled
docs corpus as the old domain, the bundled code corpus as the new one, the bundled instruction
set): pre-train a base, instruction-tune it, continue pre-training the base on code with 5%
replay, re-add ``instruct - base``, and compare with continuing the instruct model directly.
A progress line per stage on stderr, then the result table; stages are cached in ``DIR``
(default ``runs/delta_transplant``), so a second run only prints the table. About 3-5 minutes on
a quiet 2-core CPU (see ``docs/experiments/delta_transplant.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from train.experiments import config, delta_transplant, report

if "--help" not in sys.argv and "XLA_FLAGS" not in os.environ:
    # one CPU device: the tiny model trains fastest unsharded (XLA still uses every core)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/delta_transplant")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's per-checkpoint info lines
    t0 = time.perf_counter()
    out = os.path.abspath(args.out)
    res = delta_transplant.run(config.load(None), out, progress=not args.json)
    if args.json:
        print(json.dumps({"out": out, **res}))
        return 0
    print(report.table(res))
    print(f"\nreport: {os.path.join(out, 'report.md')} (plots: loss_curves.png, evals.png, "
          f"norms_per_layer.png); models in {os.path.join(out, 'models')}")
    print(f"done in {time.perf_counter() - t0:.0f} s; rerun: jaxarith experiment "
          f"delta-transplant --out {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
