"""``jaxarith lm-eval MODEL --tasks T1,T2``: lm-evaluation-harness tasks on a jaxarith model.

The model (or a logit combination) is lm-eval's ``model="jaxarith"`` (jaxarith.eval.lmeval); the
tasks are lm-eval's, plus the offline tasks shipped in jaxarith/eval/tasks/ (always on the
include path): jaxarith_mc, jaxarith_ppl, jaxarith_gen, and the group jaxarith_offline.

Logit arithmetic (every model must share MODEL's tokenizer):
  --expert E --anti-expert A --alpha a    proxy tuning: MODEL + a * (E - A)
  --eft TUNED REF --beta b               emulated fine-tuning: MODEL + b * (TUNED - REF)

Instruct models (as lm-eval's hf backend builds their prompts):
  --apply-chat-template [NAME]           prompts rendered by the model's chat template (or the
                                         tokenizer's template NAME)
  --system-instruction TEXT              a system message before every prompt
  --fewshot-as-multiturn [true|false]    few-shot examples as chat turns (default: true with a
                                         chat template)
  --member-chat-template ROLE=CHOICE...  a combination's members each with its own template:
                                         CHOICE auto, none (the plain prompt) or a NAME, e.g.
                                         --member-chat-template expert=auto base=none
                                         anti_expert=none (roles: base, expert, anti_expert;
                                         EFT: model, tuned, reference)

--batch-size auto picks the most packed rows per call that fit the device memory (at most
--max-batch-size; on a CPU 16) and reports its choice (a log line, results' config).

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
    p.add_argument("--batch-size", default="8",
                   help="packed rows per jitted scoring call, rows per generation call "
                        "(default 8), or auto: the most that fit the device memory")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="the cap of --batch-size auto (default 64; 16 on a CPU)")
    p.add_argument("--apply-chat-template", nargs="?", const=True, default=False,
                   metavar="NAME", help="render prompts with the model's chat template (NAME: "
                   "the tokenizer's template of that name)")
    p.add_argument("--system-instruction", metavar="TEXT", help="system message of every prompt")
    p.add_argument("--fewshot-as-multiturn", nargs="?", const="true", default=None,
                   metavar="true|false", help="few-shot examples as chat turns (default: true "
                   "with --apply-chat-template)")
    p.add_argument("--member-chat-template", nargs="+", default=None, metavar="ROLE=CHOICE",
                   help="per-member templates of a combination: auto, none or a NAME")
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


def _batch_size(value) -> int | str:
    """``--batch-size``: a positive integer or ``auto``."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"--batch-size {value}: expected a positive integer or auto") from None
    _common.check_positive(batch_size=n)
    return n


def _multiturn(value: str | None) -> bool | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise ConfigError(f"--fewshot-as-multiturn {value}: expected true or false")


def member_templates(args) -> dict[str, str] | None:
    """``{role: choice}`` of ``--member-chat-template ROLE=CHOICE ...`` (None without it)."""
    if args.member_chat_template is None:
        return None
    if args.expert is None and args.eft is None:
        raise ConfigError("--member-chat-template needs a combination (--expert/--anti-expert "
                          "or --eft)")
    out = {}
    for pair in args.member_chat_template:
        role, sep, choice = pair.partition("=")
        if not sep or not role or not choice:
            raise ConfigError(f"--member-chat-template {pair}: expected ROLE=auto|none|NAME")
        out[role] = choice
    return out


def _check(args) -> list[str]:
    args.batch_size = _batch_size(args.batch_size)
    _common.check_positive(max_batch_size=args.max_batch_size, max_length=args.max_length)
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
    auto = results.get("config", {}).get("auto_batch")
    if auto:
        lines.append(f"batch_size=auto chose {auto['size']} packed rows of {auto['rows_of']} "
                     f"slots ({auto['source']} budget)")
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
                       batch_size=args.batch_size, max_batch_size=args.max_batch_size,
                       log_samples=args.log_samples, seed=args.seed,
                       apply_chat_template=args.apply_chat_template,
                       system_instruction=args.system_instruction,
                       fewshot_as_multiturn=_multiturn(args.fewshot_as_multiturn),
                       member_templates=member_templates(args))
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
