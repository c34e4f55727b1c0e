"""``jaxarith delta norms|extract|apply``: measure, extract and re-apply a task vector.

- ``delta norms BASE OTHER``: the abs / square measure of base, other and their difference,
  with the ratios base/other, diff/other, diff/base (``--per-layer`` adds a breakdown;
  ``--cosine MODEL`` the cosine between OTHER - BASE and MODEL - BASE).
- ``delta extract TUNED BASE OUT``: OUT holds ``TUNED - BASE`` as a float32 checkpoint (same
  config and tensor names), so it can be streamed back.
- ``delta apply MODEL DELTA OUT [--scale S]``: OUT = MODEL + S * DELTA, in MODEL's dtype.
"""

from __future__ import annotations

from jaxarith.arith.execute import execute
from jaxarith.arith.methods import method
from jaxarith.arith.norms import delta_cosine, norms_report
from jaxarith.arith.select import MergeSpec, Selection
from jaxarith.commands import _common
from jaxarith.io.atomic import protect_inputs
from jaxarith.io.convert import pipeline


def _out_flags(p) -> None:
    p.add_argument("--to", choices=("hf", "orbax"), default="hf", help="output format")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="only these tensors (glob or substring on canonical/HF names)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave these tensors alone")
    p.add_argument("--in-memory", action="store_true",
                   help="load and run under jit instead of streaming")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--align-vocab", action="store_true",
                   help="embedding tables that differ only in padded rows (one tokenizer) are "
                        "read with the base's rows (extract: BASE; apply: MODEL)")
    _common.add_dtype(p, default=None, choices=("float32", "bfloat16", "float16"))
    _common.add_mesh(p)
    _common.add_json(p)


def register(sub) -> None:
    p = sub.add_parser("delta", help="task vectors: norms, extract, apply", description=__doc__)
    dsub = p.add_subparsers(dest="delta_command", metavar="ACTION", required=True)
    n = dsub.add_parser("norms", help="abs/square norms of base, other and their difference")
    n.add_argument("base")
    n.add_argument("other")
    n.add_argument("--measure", choices=("abs", "square"), default="abs")
    n.add_argument("--per-layer", action="store_true")
    n.add_argument("--per-tensor", action="store_true")
    n.add_argument("--cosine", metavar="MODEL", default=None,
                   help="also the cosine between OTHER - BASE and MODEL - BASE (e.g. a training "
                        "update against the instruct delta)")
    _common.add_json(n)
    n.set_defaults(handler=handle_norms)
    e = dsub.add_parser("extract", help="OUT = TUNED - BASE (float32)")
    e.add_argument("tuned")
    e.add_argument("base")
    e.add_argument("out")
    _out_flags(e)
    e.set_defaults(handler=handle_extract)
    a = dsub.add_parser("apply", help="OUT = MODEL + SCALE * DELTA")
    a.add_argument("model")
    a.add_argument("delta")
    a.add_argument("out")
    a.add_argument("--scale", type=float, default=1.0)
    _out_flags(a)
    a.set_defaults(handler=handle_apply)


def handle_norms(args) -> int:
    r = norms_report(args.base, args.other, args.measure, per_layer=args.per_layer,
                     per_tensor=args.per_tensor)
    if args.cosine:
        r["cosine"] = delta_cosine(args.other, args.base, args.cosine)
    lines = [f"measure {r['measure']}",
             f"  base   {r['base_norm']:.6e}", f"  other  {r['other_norm']:.6e}",
             f"  diff   {r['diff_norm']:.6e}",
             f"  base/other {r['base_over_other']:.6f}  diff/other {r['diff_over_other']:.6e}  "
             f"diff/base {r['diff_over_base']:.6e}"]
    if "cosine" in r:
        lines.append(f"  cosine(other - base, {args.cosine} - base) {r['cosine']:.6f}")
    for e in r.get("per_layer", []):
        lines.append(f"  layer {e['layer'] if e['layer'] is not None else '-':>5}  diff "
                     f"{e['diff_norm']:.4e}  diff/base {e['diff_over_base']:.4e}")
    _common.emit(args, r, "\n".join(lines))
    return 0


def _run(args, name: str, refs, shared, base: int) -> int:
    pipeline.recycle_memory()  # process-wide: streamed tensors reuse freed buffers

    spec = MergeSpec(method=method(name), shared=shared,
                     selection=Selection(include=tuple(args.include),
                                         exclude=tuple(args.exclude)))
    with protect_inputs(refs):
        info = execute(spec, refs, args.out, to=args.to, dtype=args.dtype,
                       mesh=_common.mesh_from(args), in_memory=args.in_memory,
                       max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                       progress=_common.progress_enabled(args),
                       align_to=base if args.align_vocab else None)
    _common.emit(args, info, f"wrote {info['out']} ({info['executor']}, "
                             f"{info.get('seconds', 0):.2f} s)")
    return 0


def handle_extract(args) -> int:
    return _run(args, "delta", [args.tuned, args.base], {}, base=1)


def handle_apply(args) -> int:
    return _run(args, "apply_delta", [args.model, args.delta], {"scale": args.scale}, base=0)
