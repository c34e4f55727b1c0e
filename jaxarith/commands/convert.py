"""``jaxarith convert SRC DST``: HF <-> Orbax, streamed one tensor at a time."""

from __future__ import annotations

from jaxarith.commands import _common
from jaxarith.io.convert import pipeline
from jaxarith.io.convert.route import convert
from jaxarith.io.refs import RefKind, ref_kind


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a model between HF safetensors and Orbax",
                       description=__doc__)
    p.add_argument("src", help="HF hub id, local HF directory or Orbax checkpoint directory")
    p.add_argument("dst", help="output directory (written atomically)")
    p.add_argument("--to", choices=("orbax", "hf"), default=None,
                   help="output format (default: the other one)")
    _common.add_dtype(p, default=None, choices=("float32", "bfloat16", "float16"))
    _common.add_mesh(p)
    p.add_argument("--max-shard-size", default="5GB", help="HF output shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--compress", action="store_true",
                   help="ZSTD-compress Orbax arrays (smaller, slower; default off)")
    _common.add_json(p)
    p.set_defaults(handler=handle)


def handle(args) -> int:
    import time

    t0 = time.perf_counter()
    to = args.to or ("hf" if ref_kind(args.src) is RefKind.ORBAX else "orbax")
    if to == "hf":  # HF writes: tensor buffers reused, not re-faulted, tensor after tensor (to
        # Orbax, tensorstore holds the buffers: there it only raised the peak RSS, by ~40%).
        # Process-wide, so the command (its own process) sets it, never the library.
        pipeline.recycle_memory()
    info = convert(args.src, args.dst, to=args.to, dtype=args.dtype,
                   mesh=_common.mesh_from(args), max_shard_size=args.max_shard_size,
                   overwrite=args.overwrite, progress=_common.progress_enabled(args),
                   compress=args.compress)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    _common.emit(args, info, f"{info['route']}: wrote {info['dst']} in {info['seconds']} s")
    return 0
