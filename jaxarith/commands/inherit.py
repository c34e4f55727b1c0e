"""``jaxarith inherit SRC OUT --layers SPEC``: a smaller (or stacked) model from SRC's layers.

Layer specs: ``first:N``, ``last:N``, ``spread:N``, ``list:0,3,5`` (see ``jaxarith.arith.inherit``).
OUT is a complete checkpoint (config with the new depth, tokenizer files) written atomically.
"""

from __future__ import annotations

from jaxarith import distributed
from jaxarith.arith import inherit as inherit_lib
from jaxarith.commands import _common
from jaxarith.io.atomic import check_destination
from jaxarith.io.convert.export import save_hf
from jaxarith.io.convert.orbax import save_orbax
from jaxarith.io.refs import load_config, load_model

CHOICES = ("inherit", "fresh")


def register(sub) -> None:
    p = sub.add_parser("inherit", help="build a model from another model's layers (Inheritune)",
                       description=__doc__)
    p.add_argument("src", help="HF hub id, local HF directory or Orbax checkpoint directory")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--layers", required=True, metavar="SPEC",
                   help="first:N | last:N | spread:N | list:i,j,...")
    p.add_argument("--parts", default="attn,mlp,norms",
                   help="block parts to inherit, of attn,mlp,norms (default all; '' for "
                        "none); the rest is freshly initialised")
    p.add_argument("--embeddings", choices=CHOICES, default="inherit")
    p.add_argument("--head", choices=CHOICES, default=None,
                   help="lm_head (default inherit; tied models: follows --embeddings)")
    p.add_argument("--final-norm", choices=CHOICES, default="inherit")
    p.add_argument("--pos-embed", choices=CHOICES, default=None,
                   help="GPT-2 position embeddings (default inherit)")
    p.add_argument("--allow-repeat", action="store_true",
                   help="let list: repeat layers (depth up-scaling)")
    p.add_argument("--seed", type=int, default=0, help="seed of freshly initialised tensors")
    _common.add_model_output(p)
    _common.add_mesh(p)
    _common.add_json(p)
    p.set_defaults(handler=handle)


def handle(args) -> int:
    import sys
    import warnings

    import jax

    # Everything that can be checked from configs is checked before any weight is read.
    check_destination(args.out, args.overwrite)
    src_cfg = load_config(args.src)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", inherit_lib.InverseLayerIdxWarning)
        plan = inherit_lib.plan(src_cfg, args.layers, parts=args.parts,
                                embeddings=args.embeddings, head=args.head,
                                final_norm=args.final_norm, pos_embed=args.pos_embed,
                                allow_repeat=args.allow_repeat)
    notes = [str(w.message) for w in caught]
    for n in notes:
        if not args.json and distributed.is_primary():  # once in a multi-process run
            print(f"warning: {n}", file=sys.stderr)

    mesh = _common.mesh_from(args)
    progress = _common.progress_enabled(args)
    src = load_model(args.src, mesh=mesh, progress=progress)
    params = inherit_lib.apply_plan(src.params, plan, jax.random.PRNGKey(args.seed), mesh)
    if args.to == "orbax":
        save_orbax(plan.config, params, args.out, tokenizer_dir=src.directory,
                   overwrite=args.overwrite)
    else:
        save_hf(plan.config, params, args.out, tokenizer_dir=src.directory,
                overwrite=args.overwrite, progress=progress)
    result = {"src_layers": src_cfg.num_hidden_layers, "layers": list(plan.layers),
              "params": plan.params, "inherited_params": plan.inherited_params,
              "out": args.out, "to": args.to}
    if notes:
        result["warnings"] = notes
    _common.emit(args, result,
                 f"wrote {args.out} ({args.to}): {len(plan.layers)} layers "
                 f"{plan.layers} of {src_cfg.num_hidden_layers}, {plan.params:,} params "
                 f"({plan.inherited_params:,} inherited)")
    return 0
