"""``jaxarith moe CONFIG.yaml OUT``: a Mixtral from dense Llama/Mistral experts, from
mergekit-moe's YAML unchanged (``base_model``, ``gate_mode``, ``experts_per_token``,
``experts[].source_model`` with ``positive_prompts`` / ``negative_prompts``, ``dtype``).

Gates are computed as mergekit-moe 0.1.5 computes them (see ``jaxarith.arith.moe_merge``); OUT is
an HF Mixtral directory (or Orbax with ``--to orbax``) with the base model's tokenizer, written
atomically. Bad input is refused before any weight is read.
"""

from __future__ import annotations

from jaxarith.arith import moe_merge
from jaxarith.commands import _common
from jaxarith.io.atomic import check_destination
from jaxarith.io.convert.export import save_hf
from jaxarith.io.convert.orbax import save_orbax


def register(sub) -> None:
    p = sub.add_parser("moe", help="Mixtral from dense experts (mergekit-moe YAML)",
                       description=__doc__)
    p.add_argument("config", help="mergekit-moe YAML file")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of random gates and expert noise (default 0)")
    p.add_argument("--allow-all-same", action="store_true",
                   help="allow every expert to be the same model (mergekit's "
                        "--i-understand-this-is-not-useful-without-training)")
    _common.add_model_output(p)
    _common.add_mesh(p)
    _common.add_json(p)
    p.set_defaults(handler=handle)


def handle(args) -> int:
    import logging
    import sys

    cfg_moe = moe_merge.load_yaml(args.config, allow_all_same=args.allow_all_same)
    check_destination(args.out, args.overwrite,
                      inputs=[cfg_moe.base_model, *(e.source_model for e in cfg_moe.experts)])
    mesh = _common.mesh_from(args)
    progress = _common.progress_enabled(args)
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    handler = Collect(logging.WARNING)
    moe_merge.log.addHandler(handler)
    try:
        cfg, params, info = moe_merge.build(cfg_moe, mesh=mesh, seed=args.seed,
                                            progress=progress)
    finally:
        moe_merge.log.removeHandler(handler)
    if args.to == "orbax":
        save_orbax(cfg, params, args.out, tokenizer_dir=info["base_dir"],
                   overwrite=args.overwrite)
    else:
        save_hf(cfg, params, args.out, tokenizer_dir=info["base_dir"], overwrite=args.overwrite,
                progress=progress)
    if not args.json:
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
    result = {"out": args.out, "to": args.to, "experts": cfg.num_local_experts,
              "experts_per_token": cfg.num_experts_per_tok, "gate_mode": cfg_moe.gate_mode,
              "dtype": info["dtype"], "degenerate_layers": info["degenerate_layers"],
              "warnings": warnings}
    _common.emit(args, result,
                 f"wrote {args.out} ({args.to}): Mixtral with {cfg.num_local_experts} experts, "
                 f"top-{cfg.num_experts_per_tok}, gates by {cfg_moe.gate_mode}")
    return 0
