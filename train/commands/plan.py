"""``jaxarith plan CONFIG.yaml --topology v5p-8 [key=value ...]``: compile the run's train step
for a TPU slice (libtpu's abstract topology: no TPU needed) and report per-chip HBM (see
:mod:`train.plan`; same as ``python -m train CONFIG --compile-only --topology SLICE``). Exits 0
when the step fits a chip's HBM, 3 when it does not (with one line naming the largest part and
what would help), 2 on bad input."""

from __future__ import annotations

import argparse

from jaxarith.commands import _common
from train import plan as plan_lib
from train.config import load_train_config

EXIT_DOES_NOT_FIT = 3


def add_plan_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--topology", metavar="SLICE", required=required, default=None,
                   help="TPU slice to compile for: v5p-8, v5e-16, v4-8, v6e-64 ... (v4 and v5p "
                        "count TensorCores, two per chip)")
    p.add_argument("--slices", type=int, default=1, metavar="N",
                   help="compile for N such slices (multislice; default 1)")


def register(sub) -> None:
    p = sub.add_parser("plan", help="compile a training run for a TPU slice and report per-chip "
                       "HBM (no TPU needed)", description=__doc__)
    p.add_argument("config", help="YAML training config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. batch=64 model.remat=true")
    add_plan_arguments(p, required=True)
    _common.add_json(p)
    p.set_defaults(handler=handle)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def report(args, result: dict) -> int:
    """Print the plan (one JSON object under --json) and return the exit code."""
    pc = result["per_chip_bytes"]
    lines = [f"{result['topology']} x {result['slices']} ({result['chips']} chips, "
             f"{_gb(result['hbm_bytes'])} HBM each; mesh "
             + ",".join(f"{k}={v}" for k, v in result["mesh"].items())
             + f"): compiled in {result['compile_seconds']:.0f} s by jax {result['jax']}, "
             f"libtpu {result['libtpu']}",
             "per chip: " + ", ".join(f"{k} {_gb(pc[k])}" for k in
                                      ("params", "optimizer", "average", "frozen", "batch",
                                       "temp")),
             f"total {_gb(pc['total'])} of {_gb(result['hbm_bytes'])} "
             f"({100 * pc['total'] / result['hbm_bytes']:.0f}%): "
             + ("fits" if result["fits"] else "DOES NOT FIT"),
             "collectives in the program (ops in a scanned layer appear once): "
             + (", ".join(f"{k} {v['count']} ({_gb(v['bytes'])})"
                          for k, v in result["collectives"].items()) or "none")]
    if not result["fits"]:
        lines.append(f"largest: {result['largest']} {_gb(pc[result['largest']])}; try "
                     f"{result['advice']}")
    _common.emit(args, result, "\n".join(lines))
    return 0 if result["fits"] else EXIT_DOES_NOT_FIT


def handle(args) -> int:
    sl = plan_lib.parse_slice(args.topology, args.slices)
    cfg = load_train_config(args.config, [*args.overrides, "out=unused-plan"]
                            if not any(o.startswith("out=") for o in args.overrides)
                            else list(args.overrides))
    try:
        result = plan_lib.plan_train(cfg, sl)
    except plan_lib.DoesNotFitError as e:  # refused before compiling: one line, exit 3
        _common.emit(args, {"error": str(e), "type": "DoesNotFitError", "fits": False,
                            "topology": sl.name, "chips": sl.total_chips,
                            "hbm_bytes": sl.hbm_bytes}, f"jaxarith plan: {e}")
        return EXIT_DOES_NOT_FIT
    return report(args, result)
