"""``convert``: any model reference to HF or Orbax, by the most memory-frugal route."""

from __future__ import annotations

import os
import sys

from jaxarith.errors import ConfigError
from jaxarith.io import paths
from jaxarith.io.atomic import check_destination, protect_inputs
from jaxarith.io.convert.export import hf_slices, save_hf
from jaxarith.io.convert.hf import resolve_hf_dir
from jaxarith.io.convert.orbax import hf_to_orbax, orbax_source, save_orbax
from jaxarith.io.refs import RefKind, load_model, ref_kind
from jaxarith.models.config import load_config


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
    compress: bool = False,
) -> dict:
    """Convert a model reference to HF safetensors or a jaxarith Orbax checkpoint.

    HF -> Orbax, Orbax -> HF and HF -> HF (re-sharding, dtype casts) stream one tensor at a
    time; Orbax -> Orbax (re-sharding, dtype casts) restores onto ``mesh`` and saves.

    Args:
      src: HF hub id, local HF directory or jaxarith Orbax checkpoint directory.
      dst: output directory, written atomically; a URL (``gs://``, any fsspec filesystem) is
        written locally, then uploaded marker last (:func:`jaxarith.io.paths.staged_output`).
      to: "orbax" or "hf" (default: the other format than ``src``).
      dtype: output dtype (default: as stored).
      mesh: mesh the Orbax arrays are placed on and saved with (default: one device).
      max_shard_size: HF output shard size.
      overwrite: replace an existing ``dst``.
      progress: show progress bars.
      compress: ZSTD-compress Orbax arrays.
    Returns:
      {"src", "dst", "route", ...}: for HF output also "files", "tensors", "bytes".
    """
    with protect_inputs([src]), \
            paths.staged_output(dst, kind="convert", overwrite=overwrite) as local:
        # every writer below refuses to replace src
        info = _convert(src, local, to=to, dtype=dtype, mesh=mesh,
                        max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                        compress=compress)
    return {**info, "dst": os.fspath(dst)}


# Any of these makes a directory's tokenizer loadable (AutoTokenizer).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _warn_without_tokenizer(src_dir: str, dst) -> bool:
    """Warn (stderr) when ``src_dir`` has no tokenizer files: the output will have none either,
    and ``generate`` / ``eval-loss`` / training from it need one. Returns whether it warned."""
    if any(os.path.exists(os.path.join(src_dir, n)) for n in _TOKENIZER_FILES):
        return False
    print(f"jaxarith convert: warning: {src_dir} has no tokenizer files, so {os.fspath(dst)} "
          "will have none and generate, eval-loss and training cannot use it as it is; copy "
          "the tokenizer files of the model it came from (tokenizer.json and "
          "tokenizer_config.json, or tokenizer.model) into it", file=sys.stderr)
    return True


def _convert(src, dst, *, to, dtype, mesh, max_shard_size, overwrite, progress,
             compress) -> dict:
    check_destination(dst, overwrite)  # before reading anything
    kind = ref_kind(src)
    to = to or ("hf" if kind is RefKind.ORBAX else "orbax")
    if to not in ("hf", "orbax"):
        raise ConfigError(f"--to {to!r}: expected 'hf' or 'orbax'")
    route = f"{'orbax' if kind is RefKind.ORBAX else 'hf'}->{to}"
    _warn_without_tokenizer(src if kind is RefKind.ORBAX else resolve_hf_dir(src), dst)
    if route == "hf->orbax":
        hf_to_orbax(src, dst, dtype=dtype, mesh=mesh, overwrite=overwrite, progress=progress,
                    compress=compress)
        info: dict = {}
    elif route == "hf->hf":
        directory = resolve_hf_dir(src)
        cfg = load_config(directory)
        info = save_hf(cfg, None, dst, slices=hf_slices(directory, cfg), dtype=dtype,
                       max_shard_size=max_shard_size, tokenizer_dir=directory,
                       overwrite=overwrite, progress=progress)
    elif route == "orbax->hf":
        cfg = load_config(src)
        info = save_hf(cfg, None, dst, source=orbax_source(src, dtype=dtype), dtype=dtype,
                       max_shard_size=max_shard_size, tokenizer_dir=src, overwrite=overwrite,
                       progress=progress)
    else:  # orbax->orbax
        model = load_model(src, mesh=mesh, dtype=dtype, progress=progress)
        save_orbax(model.config, model.params, dst, tokenizer_dir=model.directory,
                   overwrite=overwrite, compress=compress)
        info = {}
    return {"src": os.fspath(src), "dst": os.fspath(dst), "route": route, **info}
