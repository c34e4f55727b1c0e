"""``convert``: any model reference to HF or Orbax, by the most memory-frugal route."""

from __future__ import annotations

import os

from jaxarith.convert.export import save_hf
from jaxarith.convert.orbax import hf_to_orbax, orbax_source, save_orbax
from jaxarith.errors import ConfigError
from jaxarith.models.config import load_config
from jaxarith.refs import RefKind, load_model, ref_kind


def convert(
    src: str,
    dst: str | os.PathLike,
    *,
    to: str | None = None,
    dtype=None,
    mesh=None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Convert ``src`` (hub id, HF dir, Orbax dir) to ``to`` ("orbax" or "hf"; default: the other
    format). HF -> Orbax and Orbax -> HF stream one tensor at a time; same-format conversions
    (re-sharding, dtype casts) go through memory. Returns a summary dict."""
    kind = ref_kind(src)
    to = to or ("hf" if kind is RefKind.ORBAX else "orbax")
    if to not in ("hf", "orbax"):
        raise ConfigError(f"--to {to!r}: expected 'hf' or 'orbax'")
    route = f"{'orbax' if kind is RefKind.ORBAX else 'hf'}->{to}"
    if route == "hf->orbax":
        hf_to_orbax(src, dst, dtype=dtype, mesh=mesh, overwrite=overwrite, progress=progress)
        info: dict = {}
    elif route == "orbax->hf":
        cfg = load_config(src)
        info = save_hf(cfg, None, dst, source=orbax_source(src, dtype=dtype), dtype=dtype,
                       max_shard_size=max_shard_size, tokenizer_dir=src, overwrite=overwrite,
                       progress=progress)
    else:
        model = load_model(src, mesh=mesh, dtype=dtype, progress=progress)
        if to == "hf":
            info = save_hf(model.config, model.params, dst, dtype=dtype,
                           max_shard_size=max_shard_size, tokenizer_dir=model.directory,
                           overwrite=overwrite, progress=progress)
        else:
            save_orbax(model.config, model.params, dst, tokenizer_dir=model.directory,
                       overwrite=overwrite)
            info = {}
    return {"src": os.fspath(src), "dst": os.fspath(dst), "route": route, **info}
