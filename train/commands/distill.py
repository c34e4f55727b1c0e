"""``jaxarith distill cache TEACHER CONFIG.yaml OUT --top-k K``: offline teacher outputs.

Runs the teacher once over the training windows of a train config's data (the run's tokenizer,
packing and ``seq_len``) and writes its top-k ids, log-probabilities and remaining mass per
position as ArrayRecord shards; train from it with ``distill: {cache: OUT}``. Rerunning an
interrupted command resumes at the first unfinished shard; OUT appears only when complete.
"""

from __future__ import annotations

from jaxarith.commands import _common
from jaxarith.data.pipeline import load_sources
from jaxarith.distill import cache as distill_cache
from jaxarith.errors import ConfigError
from train import loop
from train.config import load_train_config


def register(sub) -> None:
    p = sub.add_parser("distill", help="distillation tools (offline teacher top-k cache)",
                       description=__doc__)
    dsub = p.add_subparsers(dest="distill_command", metavar="SUBCOMMAND", required=True)
    c = dsub.add_parser("cache", help="write a teacher's top-k per position over a train "
                        "config's data", description=__doc__)
    c.add_argument("teacher", help="teacher model reference (hub id, HF dir, Orbax dir)")
    c.add_argument("config", help="the train config (YAML) whose data the cache is for")
    c.add_argument("out", help="output cache directory")
    c.add_argument("--top-k", type=int, required=True, dest="top_k",
                   help="teacher ids kept per position")
    c.add_argument("--batch", type=int, default=8, help="windows per teacher forward (default 8)")
    c.add_argument("--shard-windows", type=int, default=2048,
                   help="windows per ArrayRecord shard, the unit of resumption (default 2048)")
    c.add_argument("--teacher-dtype", default="float32", choices=("float32", "bfloat16"))
    c.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    c.add_argument("overrides", nargs="*", metavar="key=value",
                   help="train config overrides (e.g. data.seq_len=256)")
    _common.add_mesh(c)
    _common.add_json(c)
    c.set_defaults(handler=handle_cache)


def handle_cache(args) -> int:
    if args.batch < 1 or args.shard_windows < 1:
        raise ConfigError("--batch and --shard-windows must be positive")
    cfg = load_train_config(args.config, [*args.overrides, "out=" + args.out + ".run"]
                      if not _has_out(args.overrides) else args.overrides)
    model_dir = loop.model_config(cfg)[1] if cfg.model.ref else None
    tokenizer = loop.tokenizer_for(cfg, model_dir)
    sources = load_sources(cfg.data, tokenizer)
    res = distill_cache.write_cache(
        args.teacher, sources, tokenizer, args.out, k=args.top_k, seq_len=cfg.data.seq_len,
        mesh=_common.mesh_from(args), batch=args.batch, shard_windows=args.shard_windows,
        overwrite=args.overwrite, progress=_common.progress_enabled(args),
        dtype=args.teacher_dtype)
    human = (f"wrote {res['records']} windows x {cfg.data.seq_len} positions of the teacher's "
             f"top-{res['k']} to {res['path']} ({res['shards']} shard(s), "
             f"{res['resumed_shards']} resumed, {res['seconds']} s)")
    _common.emit(args, res, human)
    return 0


def _has_out(overrides) -> bool:
    return any(o.split("=", 1)[0].strip() == "out" for o in overrides)
