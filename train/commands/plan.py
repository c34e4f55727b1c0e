"""``jaxarith plan CONFIG.yaml --topology v5p-8 [key=value ...]``: compile the run's train step
for a TPU slice (libtpu's abstract topology: no TPU needed) and report per-chip HBM (see
:mod:`train.plan`; same as ``python -m train CONFIG --compile-only --topology SLICE``).

``jaxarith plan --program generate MODEL --topology v5p-8 --batch B --prompt-len P
--max-new-tokens N`` plans ``jaxarith generate`` instead (with its flags: ``--expert
--anti-expert`` proxy tuning, ``--eft TUNED REF`` emulated fine-tuning, ``--speculative K``),
and ``--program lm-eval MODEL --batch B --max-length L`` the lm-eval scorer: the programs those
commands jit, compiled for abstract parameters (see :mod:`jaxarith.planning.inference`; MODEL may
be a config.json or a preset name: no weights are read).

Exits 0 when the program fits a chip's HBM, 3 when it does not (with one line naming the largest
part and what would help), 2 on bad input."""

from __future__ import annotations

import argparse

from jaxarith.commands import _common
from jaxarith.errors import ConfigError
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
    p.add_argument("config", metavar="CONFIG|MODEL",
                   help="train: YAML training config (see configs/); generate, lm-eval: a model "
                        "as those commands take it (HF directory, hub id, Orbax directory), a "
                        "config.json or a preset name (jaxarith.models.presets)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="train: dotted config overrides, e.g. batch=64 model.remat=true")
    add_plan_arguments(p, required=True)
    p.add_argument("--program", choices=PROGRAMS, default="train",
                   help="what to plan: the train step (default), generate's prefill and decode "
                        "programs, or the lm-eval scorer")
    g = p.add_argument_group("generate and lm-eval")
    _common.add_combination(g)
    g.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="generate with --eft: the smaller model drafts K tokens per round")
    g.add_argument("--batch", type=int, default=None,
                   help="prompts per generate call / packed rows per lm-eval call (default 1 / 8)")
    g.add_argument("--prompt-len", type=int, default=None,
                   help="generate: the longest prompt's tokens (default 128)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="generate (default 64)")
    g.add_argument("--max-length", type=int, default=None,
                   help="lm-eval: the window (default: the models' context length)")
    g.add_argument("--mesh", default=None, metavar="SPEC",
                   help="device mesh over the slice's chips (default fsdp=-1: every chip)")
    _common.add_dtype(g)
    _common.add_json(p)
    p.set_defaults(handler=handle)


PROGRAMS = ("train", "generate", "lm-eval")
_INFERENCE_FLAGS = ("expert", "anti_expert", "eft", "batch", "prompt_len", "max_new_tokens",
                    "max_length", "mesh")


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
             "per chip: " + ", ".join(f"{k} {_gb(v)}" for k, v in pc.items()
                                      if k not in ("argument", "output", "alias", "total")),
             *(f"  {name}: " + ", ".join(f"{k} {_gb(v)}" for k, v in mem.items())
               for name, mem in result.get("programs", {}).items()),
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


def _plan_inference(args, sl) -> dict:
    # the decoding modules load only for --program generate|lm-eval, not for a train plan
    from jaxarith.commands.generate import check_mode
    from jaxarith.decode.combine import members_for
    from jaxarith.decode.speculative import eft_drafter
    from jaxarith.planning import inference

    if args.overrides:
        raise ConfigError(f"--program {args.program} takes no KEY=VALUE overrides (got "
                          f"{' '.join(args.overrides)})")
    args.model = args.config
    mode = check_mode(args)
    cfgs = [inference.model_config(r) for r in _common.combination_refs(args, mode)]
    members = members_for(mode, cfgs, alpha=args.alpha, beta=args.beta)
    mesh = args.mesh or "fsdp=-1"
    if args.program == "lm-eval":
        if args.speculative or args.prompt_len is not None or args.max_new_tokens is not None:
            raise ConfigError("--program lm-eval takes --batch and --max-length (no "
                              "--speculative, --prompt-len, --max-new-tokens)")
        max_length = args.max_length or min(c.context_length for c in cfgs)
        _common.check_positive(batch=args.batch, max_length=max_length)
        return inference.plan_lm_eval(members, sl, mesh_spec=mesh, batch=args.batch or 8,
                                      max_length=max_length, dtype=args.dtype)
    if args.max_length is not None:
        raise ConfigError("--max-length is lm-eval's: --program generate takes --prompt-len "
                          "and --max-new-tokens")
    batch, prompt_len = args.batch or 1, args.prompt_len or 128
    new = args.max_new_tokens or 64
    _common.check_positive(batch=batch, prompt_len=prompt_len, max_new_tokens=new)
    return inference.plan_generate(
        members, sl, mesh_spec=mesh, batch=batch, prompt_len=prompt_len, max_new_tokens=new,
        dtype=args.dtype, speculative_k=args.speculative,
        drafter=eft_drafter(cfgs) if args.speculative else 1)


def handle(args) -> int:
    sl = plan_lib.parse_slice(args.topology, args.slices)
    if getattr(args, "program", "train") != "train":
        try:
            result = _plan_inference(args, sl)
        except plan_lib.DoesNotFitError as e:
            return _refused(args, sl, e)
        return report(args, result)
    given = [f"--{f.replace('_', '-')}" for f in _INFERENCE_FLAGS if getattr(args, f, None)]
    if given or getattr(args, "speculative", 0):
        raise ConfigError(f"{', '.join(given) or '--speculative'}: flags of --program generate "
                          f"/ lm-eval; the train plan takes KEY=VALUE overrides (batch=64, "
                          f"mesh=fsdp=4)")
    cfg = load_train_config(args.config, [*args.overrides, "out=unused-plan"]
                            if not any(o.startswith("out=") for o in args.overrides)
                            else list(args.overrides))
    try:
        result = plan_lib.plan_train(cfg, sl)
    except plan_lib.DoesNotFitError as e:
        return _refused(args, sl, e)
    return report(args, result)


def _refused(args, sl, e: Exception) -> int:
    """Refused before compiling: one line, exit 3."""
    _common.emit(args, {"error": str(e), "type": "DoesNotFitError", "fits": False,
                        "topology": sl.name, "chips": sl.total_chips,
                        "hbm_bytes": sl.hbm_bytes}, f"jaxarith plan: {e}")
    return EXIT_DOES_NOT_FIT
