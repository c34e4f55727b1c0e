"""``jaxarith upcycle DENSE OUT --experts E --top-k K``: sparse upcycling of a dense Llama/Mistral
into a Mixtral whose experts are copies of each layer's MLP (see ``jaxarith.arith.upcycle``).

With exact copies (no ``--noise``) OUT computes DENSE's function, whatever the router. OUT is a
complete checkpoint (Mixtral config, tokenizer files) written atomically.
"""

from __future__ import annotations

from jaxarith.arith import upcycle
from jaxarith.commands import _common
from jaxarith.errors import ConfigError
from jaxarith.io.atomic import check_destination
from jaxarith.io.convert.export import save_hf
from jaxarith.io.convert.orbax import save_orbax
from jaxarith.io.refs import load_config, load_model
from jaxarith.models.transformer import num_params


def register(sub) -> None:
    p = sub.add_parser("upcycle", help="dense Llama/Mistral -> Mixtral (sparse upcycling)",
                       description=__doc__)
    p.add_argument("dense", help="HF hub id, local HF directory or Orbax checkpoint directory")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--experts", type=int, required=True, metavar="E", help="experts per layer")
    p.add_argument("--top-k", type=int, required=True, metavar="K", help="experts per token")
    p.add_argument("--noise", type=float, default=0.0, metavar="STD",
                   help="std of Gaussian noise added to each expert copy (default 0: exact)")
    p.add_argument("--router", choices=("random", "zeros"), default="random",
                   help="router init: normal(0, 0.02) or zeros (default random)")
    p.add_argument("--seed", type=int, default=0, help="seed of the router and the noise")
    _common.add_model_output(p)
    _common.add_mesh(p)
    _common.add_json(p)
    p.set_defaults(handler=handle)


def handle(args) -> int:
    import jax

    # everything checkable from configs is checked before any weight is read
    if args.noise < 0:
        raise ConfigError(f"--noise {args.noise} must be >= 0")
    check_destination(args.out, args.overwrite, inputs=[args.dense])
    dense_cfg = load_config(args.dense)
    cfg = upcycle.upcycle_config(dense_cfg, args.experts, args.top_k)

    mesh = _common.mesh_from(args)
    progress = _common.progress_enabled(args)
    src = load_model(args.dense, mesh=mesh, progress=progress)
    params = upcycle.upcycle_params(src.params, cfg, jax.random.PRNGKey(args.seed),
                                    noise=args.noise, router=args.router, mesh=mesh)
    if args.to == "orbax":
        save_orbax(cfg, params, args.out, tokenizer_dir=src.directory, overwrite=args.overwrite)
    else:
        save_hf(cfg, params, args.out, tokenizer_dir=src.directory, overwrite=args.overwrite,
                progress=progress)
    total = num_params(cfg)
    result = {"out": args.out, "to": args.to, "experts": args.experts, "top_k": args.top_k,
              "noise": args.noise, "router": args.router, "dense_params": num_params(dense_cfg),
              "params": total}
    _common.emit(args, result,
                 f"wrote {args.out} ({args.to}): Mixtral with {args.experts} experts, top-"
                 f"{args.top_k}, {total:,} params (dense: {num_params(dense_cfg):,})")
    return 0
