"""Orbax checkpoints of the canonical tree: save, streamed HF -> Orbax, restore on any mesh.

A jaxarith Orbax checkpoint is a directory::

    DST/
      jaxarith.json      metadata: format, architecture, dtype, jaxarith version, layer stacking
      config.json        the HF config (written back losslessly from the model config)
      tokenizer files    copied from the source, when it has them
      params/            an orbax-checkpoint (v1 API) pytree of the canonical parameters

Restoring builds an abstract tree of ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` from the
model config and the target mesh, so a checkpoint written on one mesh restores onto any other mesh,
one device, or another dtype, each process reading only the slices its devices hold.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxarith import __version__
from jaxarith.atomic import atomic_dir
from jaxarith.convert.hf import get_path, iter_hf_leaves, resolve_hf_dir, set_path
from jaxarith.errors import CheckpointError
from jaxarith.models.config import ModelConfig, load_config, save_config
from jaxarith.models.transformer import abstract_params
from jaxarith.refs import ORBAX_METADATA

PARAMS_DIR = "params"
FORMAT = "jaxarith.orbax.v1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.jinja")


def copy_side_files(src_dir: str | None, dst_dir: str) -> list[str]:
    """Copy tokenizer and generation-config files that exist in ``src_dir``."""
    copied = []
    if src_dir:
        for name in TOKENIZER_FILES:
            path = os.path.join(src_dir, name)
            if os.path.exists(path):
                shutil.copy2(path, os.path.join(dst_dir, name))
                copied.append(name)
    return copied


def _write_metadata(cfg: ModelConfig, directory: str, dtype: str) -> None:
    meta = {"format": FORMAT, "architecture": str(cfg.arch), "model_type": cfg.model_type,
            "dtype": dtype, "jaxarith_version": __version__, "layer_stacking": "stacked",
            "params_dir": PARAMS_DIR}
    with open(os.path.join(directory, ORBAX_METADATA), "w") as f:
        json.dump(meta, f, indent=2)


def _leaf_dtype(params) -> str:
    dtypes = {str(x.dtype) for x in jax.tree.leaves(params)}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"


def save_orbax(cfg: ModelConfig, params: dict, dst: str | os.PathLike, *,
               tokenizer_dir: str | None = None, overwrite: bool = False) -> str:
    """Save an in-memory canonical tree as a jaxarith Orbax checkpoint (atomically)."""
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        ocp.v1.save_pytree(os.path.join(tmp, PARAMS_DIR), params)
        save_config(cfg, tmp)
        copy_side_files(tokenizer_dir, tmp)
        _write_metadata(cfg, tmp, _leaf_dtype(params))
    return os.fspath(dst)


def hf_to_orbax(src: str, dst: str | os.PathLike, *, dtype=None, mesh=None,
                overwrite: bool = False, progress: bool = True) -> str:
    """Stream an HF checkpoint into an Orbax one, one canonical tensor at a time.

    Each tensor is read from safetensors onto its sharding, saved with
    ``orbax.checkpoint.v1.partial.save`` and released before the next one, so host memory stays
    near the largest tensor; ``partial.finalize`` commits the checkpoint at the end.
    """
    directory = resolve_hf_dir(src)
    cfg = load_config(directory)
    dtypes = set()
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        target = os.path.join(tmp, PARAMS_DIR)
        for path, value in iter_hf_leaves(directory, cfg, mesh=mesh, dtype=dtype,
                                          progress=progress):
            tree: dict = {}
            set_path(tree, path, value)
            ocp.v1.partial.save(target, tree)
            dtypes.add(str(value.dtype))
            del tree, value
        ocp.v1.partial.finalize(target)
        save_config(cfg, tmp)
        copy_side_files(directory, tmp)
        _write_metadata(cfg, tmp, dtypes.pop() if len(dtypes) == 1 else "mixed")
    return os.fspath(dst)


def read_metadata(ref: str | os.PathLike) -> dict:
    path = os.path.join(os.fspath(ref), ORBAX_METADATA)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable jaxarith metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def _abstract(cfg: ModelConfig, ref: str, mesh, dtype) -> dict:
    """Abstract target: shapes from the config, dtype as stored unless asked, shardings."""
    stored = stored_arrays(ref)

    def one(path, a: jax.ShapeDtypeStruct):
        name = "/".join(str(k.key) for k in path)
        if name not in stored:
            raise CheckpointError(f"{ref}: tensor {name} missing from the Orbax checkpoint")
        shape, stored_dtype = stored[name]
        if tuple(shape) != a.shape:
            raise CheckpointError(f"{ref}: tensor {name} has shape {list(shape)}, config.json "
                                  f"expects {list(a.shape)}")
        shd = a.sharding if mesh is not None else \
            jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype or stored_dtype), sharding=shd)

    return jax.tree.map_with_path(one, abstract_params(cfg, mesh=mesh))


def stored_arrays(ref: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"layers/attn/q": (shape, dtype)} as recorded in the checkpoint's metadata."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        meta = ocp.v1.pytree_metadata(os.path.join(os.fspath(ref), PARAMS_DIR)).metadata
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(
            meta, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")):
        out["/".join(str(k.key) for k in path)] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
    return out


def load_orbax(ref: str | os.PathLike, *, mesh=None, dtype=None,
               paths: list[tuple[str, ...]] | None = None) -> tuple[ModelConfig, dict]:
    """Restore a jaxarith Orbax checkpoint onto ``mesh`` (one device if None), in ``dtype``.

    Args:
      paths: restore only these canonical leaves (e.g. ``[("embed",)]``), for streaming exports.
    """
    ref = os.fspath(ref)
    read_metadata(ref)
    cfg = load_config(ref)
    target = _abstract(cfg, ref, mesh, dtype)
    if paths is not None:
        sub: dict = {}
        for p in paths:
            set_path(sub, p, get_path(target, p))
        target = sub
    ctx = ocp.v1.Context()
    ctx.pytree.loading.partial_load = paths is not None
    with ctx, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        params = ocp.v1.load_pytree(os.path.join(ref, PARAMS_DIR), target)
    return cfg, params


def orbax_source(ref: str, *, dtype=None):
    """A leaf source for :func:`jaxarith.convert.export.save_hf` restoring tensors on demand."""
    def source(paths):
        _, tree = load_orbax(ref, dtype=dtype, paths=paths)
        return {p: get_path(tree, p) for p in paths}

    return source
