"""``jaxarith experiment {delta-transplant,weak-to-strong,distill-vs-inherit} [--config C]
[--out DIR] [--json]``: the seeds' experiments end to end (stages cached in DIR; rerun to
resume)."""

from __future__ import annotations

from jaxarith.commands import _common
from train.experiments import config, delta_transplant, report, report_w2s, weak_to_strong
from train.experiments import distill_vs_inherit as dvi


def register(sub) -> None:
    p = sub.add_parser("experiment", help="run a research experiment end to end (cached stages)",
                       description=__doc__)
    exps = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    d = exps.add_parser(
        "delta-transplant",
        help="pre-train, instruction-tune, continue pre-training, re-add the instruct delta",
        description="(a) pre-train a base, (b) instruction-tune it, (c) delta = instruct - base "
                    "and its norms, (d) continue pre-training the base on a new domain, "
                    "(e) final = trained + delta, (f) continue pre-training the instruct model; "
                    "evaluate all on new/old-domain loss and the instruction eval. Without "
                    "--config: the embedded tiny default on the bundled data (a few minutes "
                    "on a CPU).")
    d.add_argument("--config", default=None,
                   help="experiment YAML deep-merged over the embedded default "
                        "(e.g. configs/experiments/delta_transplant_llama3_2_1b.yaml)")
    d.add_argument("--out", default=None,
                   help="output directory (default: the config's out, runs/delta_transplant)")
    _common.add_json(d)
    d.set_defaults(handler=handle_delta_transplant)
    w = exps.add_parser(
        "weak-to-strong",
        help="a small tuned model steering a large base: proxy tuning, EFT, speculative EFT",
        description="Pre-train a small and a large base on the same data, instruction-tune both "
                    "(the large one as the reference), evaluate proxy tuning and EFT up-scaling "
                    "on the instruction eval (share of the gap closed), and time plain vs "
                    "speculative EFT. Without --config: the embedded tiny default.")
    w.add_argument("--config", default=None, help="experiment YAML deep-merged over the default")
    w.add_argument("--out", default=None, help="output directory (default runs/weak_to_strong)")
    _common.add_json(w)
    w.set_defaults(handler=handle_weak_to_strong)
    v = exps.add_parser(
        "distill-vs-inherit",
        help="Inheritune vs distillation: one student from scratch, inherited, distilled, both",
        description="Train a teacher, then the same smaller student four ways at equal steps "
                    "and data: from scratch, initialised from the teacher's first layers "
                    "(Inheritune), distilled from the teacher, and both; report the held-out "
                    "loss and KL to the teacher. Without --config: the embedded default (about "
                    "10 minutes on this CPU).")
    v.add_argument("--config", default=None, help="experiment YAML deep-merged over the default")
    v.add_argument("--out", default=None,
                   help="output directory (default runs/distill_vs_inherit)")
    _common.add_json(v)
    v.set_defaults(handler=handle_distill_vs_inherit)


def handle_delta_transplant(args) -> int:
    import os

    cfg = config.load(args.config)
    out = os.path.abspath(args.out or cfg["out"])
    res = delta_transplant.run(cfg, out, progress=not args.json)
    _common.emit(args, {"out": out, **res},
                 f"{report.table(res)}\n\nreport: {os.path.join(out, 'report.md')}")
    return 0


def handle_weak_to_strong(args) -> int:
    import os

    cfg = weak_to_strong.load_experiment_config(args.config)
    out = os.path.abspath(args.out or cfg["out"])
    res = weak_to_strong.run(cfg, out, progress=not args.json)
    _common.emit(args, {"out": out, **res},
                 f"{report_w2s.table(res)}\n\nreport: {os.path.join(out, 'report.md')}")
    return 0


def handle_distill_vs_inherit(args) -> int:
    import os

    cfg = dvi.load_experiment_config(args.config)
    out = os.path.abspath(args.out or cfg["out"])
    res = dvi.run(cfg, out, progress=not args.json)
    _common.emit(args, {"out": out, **{k: v for k, v in res.items() if k != "curves"}},
                 f"{dvi.table(res)}\n\nreport: {os.path.join(out, 'report.md')}")
    return 0
