"""``jaxarith extract-lora TUNED BASE OUT --rank R``: a PEFT LoRA adapter of ``TUNED - BASE``.

Every linear weight's task vector is factored by a truncated SVD (``lora_A``, ``lora_B``); the
embeddings, output head and norms are saved whole (``modules_to_save``), as
``mergekit-extract-lora`` does (see ``jaxarith.arith.lora``). Load OUT with PEFT on BASE, or
name ``BASE+OUT`` wherever jaxarith takes a model.
"""

from __future__ import annotations

from jaxarith.arith.lora import extract_lora
from jaxarith.commands import _common
from jaxarith.io.atomic import protect_inputs


def register(sub) -> None:
    p = sub.add_parser("extract-lora", help="a PEFT LoRA adapter from TUNED - BASE (SVD)",
                       description=__doc__)
    p.add_argument("tuned", help="the fine-tuned model (HF hub id or directory)")
    p.add_argument("base", help="the base model it was tuned from")
    p.add_argument("out", help="adapter directory (written atomically)")
    p.add_argument("--rank", type=int, required=True, metavar="R",
                   help="largest rank of a factor (mergekit's --max-rank)")
    p.add_argument("--sv-epsilon", type=float, default=0.0, metavar="EPS",
                   help="drop singular values at or below EPS (default 0: keep R)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    _common.add_json(p)
    p.set_defaults(handler=handle)


def handle(args) -> int:
    with protect_inputs([args.tuned, args.base]):
        info = extract_lora(args.tuned, args.base, args.out, rank=args.rank,
                            sv_epsilon=args.sv_epsilon, overwrite=args.overwrite,
                            progress=_common.progress_enabled(args))
    _common.emit(args, info, f"wrote {info['out']}: {info['modules']} modules at rank <= "
                             f"{info['rank']}, {info['saved']} tensors whole "
                             f"({info['seconds']:.2f} s)")
    return 0
