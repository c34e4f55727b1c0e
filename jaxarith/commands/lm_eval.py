"""``jaxarith lm-eval MODEL --tasks T1,T2``: lm-evaluation-harness tasks on a jaxarith model.

The model (or a logit combination) is lm-eval's ``model="jaxarith"`` (jaxarith.eval.lmeval); the
tasks are lm-eval's, plus the offline tasks shipped in jaxarith/eval/tasks/ (always on the
include path): jaxarith_mc, jaxarith_ppl, jaxarith_gen, and the group jaxarith_offline.

Logit arithmetic (every model must share MODEL's tokenizer):
  --expert E --anti-expert A --alpha a    proxy tuning: MODEL + a * (E - A)
  --eft TUNED REF --beta b               emulated fine-tuning: MODEL + b * (TUNED - REF)

--output-path DIR writes DIR/results.json (and DIR/samples.jsonl with --log-samples), atomically.
Needs the eval extra: pip install 'jaxarith[eval]'.
"""

from __future__ import annotations

import argparse
import json
import os

from jaxarith.commands import _common
from jaxarith.distributed import on_primary
from jaxarith.errors import ConfigError
from jaxarith.io.atomic import atomic_dir, check_destination


def register(sub) -> None:
    p = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks (proxy tuning, EFT too)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="HF hub id, local HF directory or Orbax checkpoint directory")
    p.add_argument("--tasks", required=True, help="comma-separated task or group names")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="more task YAML directories (repeatable; jaxarith's own are always in)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task (a fraction below 1 is a share of each task)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="packed rows per jitted scoring call, rows per generation call (default 8)")
    p.add_argument("--max-length", type=int, default=None,
                   help="scoring window in tokens (default: the model's context length)")
    _common.add_combination(p)
    p.add_argument("--seed", type=int, default=None, help="lm-eval's seeds (few-shot "
                   "sampling ...) and the model's sampling seed (default: lm-eval's defaults, "
                   "model seed 0)")
    p.add_argument("--output-path", metavar="DIR", help="write results.json here (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-path")
    p.add_argument("--log-samples", action="store_true",
                   help="with --output-path: also write every request and response")
    _common.add_mesh(p)
    _common.add_dtype(p)
    _common.add_json(p)
    p.set_defaults(handler=handle)


def model_args(args) -> dict:
    """The ``model_args`` dict of ``model="jaxarith"`` for these flags."""
    out = {"pretrained": args.model, "dtype": args.dtype}
    if args.mesh:
        out["mesh"] = args.mesh
    if args.max_length is not None:
        out["max_length"] = args.max_length
    if args.expert is not None or args.anti_expert is not None:
        out.update(expert=args.expert, anti_expert=args.anti_expert, alpha=args.alpha)
    if args.eft is not None:
        out.update(eft_tuned=args.eft[0], eft_ref=args.eft[1], beta=args.beta)
    if args.seed is not None:
        out["seed"] = args.seed
    return out


def _check(args) -> list[str]:
    _common.check_positive(batch_size=args.batch_size, max_length=args.max_length)
    if args.expert is not None and args.eft is not None:
        raise ConfigError("--expert/--anti-expert and --eft are exclusive")
    if (args.expert is None) != (args.anti_expert is None):
        raise ConfigError("proxy tuning needs both --expert and --anti-expert")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {args.num_fewshot}: must be >= 0")
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"--limit {args.limit}: must be positive")
    if args.log_samples and not args.output_path:
        raise ConfigError("--log-samples needs --output-path")
    for d in args.include_path:
        if not os.path.isdir(d):
            raise ConfigError(f"--include-path {d}: not a directory")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give at least one task name")
    return tasks


def _summary(results: dict) -> str:
    lines = []
    for task, metrics in results.get("results", {}).items():
        shown = ", ".join(f"{k.split(',')[0]}={v:.4g}" for k, v in metrics.items()
                          if "," in k and "_stderr" not in k and isinstance(v, int | float))
        lines.append(f"{task}: {shown}")
    return "\n".join(lines)


def handle(args) -> int:
    # lm-eval is an optional extra: its package is imported only when the command runs
    from jaxarith.eval.lmeval.run import evaluate, jsonable

    tasks = _check(args)
    if args.output_path:  # refuse a bad destination before the models load (on process 0)

        on_primary(lambda: str(check_destination(args.output_path, args.overwrite,
                                                 inputs=[args.model])),
                   f"check --output-path {args.output_path}")
    # validates the spec and applies --strict-sharding (several processes: fsdp=-1 default)
    _common.mesh_from(args)
    # several processes: process 0 runs lm-eval, the others follow it and get None
    results = evaluate(model_args(args), tasks, include_path=args.include_path,
                       num_fewshot=args.num_fewshot, limit=args.limit,
                       batch_size=args.batch_size, log_samples=args.log_samples,
                       seed=args.seed)
    samples = None if results is None else results.pop("samples", None)
    results = None if results is None else jsonable(results)
    if args.output_path:  # every process takes part; process 0 writes the files
        with atomic_dir(args.output_path, overwrite=args.overwrite, inputs=[args.model],
                        kind="lm-eval") as tmp:
            if results is not None:
                _write(tmp, results, samples)
    if results is not None:
        _common.emit(args, results, _summary(results))
    return 0


def _write(directory: str, results: dict, samples: dict | None) -> None:
    """results.json (and samples.jsonl with --log-samples) in ``directory``."""
    from jaxarith.eval.lmeval.run import jsonable  # lm-eval is optional (see handle)

    with open(os.path.join(directory, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if samples is not None:
        with open(os.path.join(directory, "samples.jsonl"), "w") as f:
            for task, rows in samples.items():
                for row in rows:
                    f.write(json.dumps(jsonable({"task": task, **row})) + "\n")
