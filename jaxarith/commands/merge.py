"""``jaxarith merge CONFIG.yaml OUT``: merge models as a YAML config says (mergekit's fields).

Methods: mergekit 0.1.5's linear (soups), task_arithmetic, ties, dare_linear, dare_ties,
breadcrumbs, breadcrumbs_ties, della, della_linear, slerp, nearswap, model_stock, sce, nuslerp,
multislerp, arcee_fusion, karcher (``--list-methods`` prints each with its parameters);
per-model weights and densities, schedules over depth, filters, include/exclude patterns.
Inputs are rounded to the config's ``dtype``; OUT is written in ``out_dtype`` (else ``dtype``,
else as the first input). Streamed tensor by tensor when every model is an HF checkpoint and OUT
is HF.
"""

from __future__ import annotations

import json

from jaxarith.arith import stack
from jaxarith.arith.execute import execute, execute_stack
from jaxarith.arith.mergeconfig import StackConfig, load_merge_config
from jaxarith.arith.methods import MERGE_METHODS, describe
from jaxarith.commands import _common
from jaxarith.errors import ConfigError
from jaxarith.io.atomic import protect_inputs
from jaxarith.io.convert import pipeline
from jaxarith.io.refs import load_config


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge models from a YAML config (mergekit field names)",
                       description=__doc__)
    p.add_argument("config", nargs="?", help="YAML merge config")
    p.add_argument("out", nargs="?", help="output directory (written atomically)")
    p.add_argument("--list-methods", action="store_true",
                   help="print the merge methods with their parameters and defaults, and exit")
    p.add_argument("--to", choices=("hf", "orbax"), default="hf", help="output format")
    p.add_argument("--in-memory", action="store_true",
                   help="load and run under jit instead of streaming")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--align-vocab", action="store_true",
                   help="embedding tables that differ only in padded rows (one tokenizer) are "
                        "read with the rows of the first model (the base_model where the "
                        "method has one)")
    _common.add_mesh(p)
    _common.add_json(p)
    p.set_defaults(handler=handle)


def _num_layers(ref: str) -> int:
    return load_config(ref).num_hidden_layers


def _list_methods(args) -> int:
    methods = [describe(k) for k in MERGE_METHODS] + [stack.DESCRIPTION]
    lines = []
    for d in methods:
        n = d["models"]
        count = (f"{n['min']}" if n["min"] == n["max"] else
                 f"{n['min']}+" if n["max"] is None else f"{n['min']}-{n['max']}")
        lines.append(f"{d['name']}: {d['summary']}")
        lines.append(f"    base_model: {d['base_model']}; models besides the base: {count}")
        for what, key in (("parameters", "parameters"), ("per model", "model_parameters"),
                          ("options", "options")):
            if d[key]:
                vals = ", ".join(f"{k}={'(required)' if v is None else json.dumps(v)}"
                                 for k, v in d[key].items())
                lines.append(f"    {what}: {vals}")
    _common.emit(args, {"methods": methods}, "\n".join(lines))
    return 0


def handle(args) -> int:
    if args.list_methods:
        return _list_methods(args)
    if args.config is None or args.out is None:
        raise ConfigError("merge: give CONFIG and OUT (or --list-methods)")
    pipeline.recycle_memory()  # process-wide: streamed tensors reuse freed buffers

    mc = load_merge_config(args.config)
    if isinstance(mc, StackConfig):  # passthrough slices: layers stacked, not merged
        with protect_inputs([args.config, *mc.models]):
            info = execute_stack(mc, args.out, to=args.to, max_shard_size=args.max_shard_size,
                                 overwrite=args.overwrite,
                                 progress=_common.progress_enabled(args))
        info["method"] = "passthrough"
        _common.emit(args, info, f"passthrough: {info['layers']} layers stacked from "
                                 f"{len(mc.slices)} slices into {info['out']}")
        return 0
    if mc.layer_ranges:  # before any work: a partial range is an error, not a full merge
        mc.check_layer_ranges(_num_layers(mc.models[0]))
    with protect_inputs([args.config, *mc.models]):
        info = execute(mc.spec, list(mc.models), args.out, to=args.to, dtype=mc.out_dtype,
                       mesh=_common.mesh_from(args), in_memory=args.in_memory,
                       max_shard_size=args.max_shard_size, tokenizer_from=mc.tokenizer_source,
                       vocab=mc.vocab,
                       chat_template=mc.chat_template, align_to=0 if args.align_vocab else None,
                       overwrite=args.overwrite, progress=_common.progress_enabled(args))
    info["method"] = str(mc.spec.method.kind)
    _common.emit(args, info, f"{info['method']}: wrote {info['out']} ({info['executor']}, "
                             f"{info.get('seconds', 0):.2f} s)")
    return 0
