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

import dataclasses
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxarith import __version__, distributed
from jaxarith.errors import CheckpointError, innermost_cause
from jaxarith.io.atomic import atomic_dir
from jaxarith.io.convert.hf import get_path, iter_hf_leaves, resolve_hf_dir, set_path
from jaxarith.io.finite import check_input_tree, check_output, check_output_tree
from jaxarith.models.config import ModelConfig, load_config, save_config
from jaxarith.models.transformer import abstract_params

PARAMS_DIR = "params"
FORMAT = "jaxarith.orbax.v1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.jinja")

# An Orbax checkpoint written by jaxarith holds this metadata record next to the arrays (the
# model references of jaxarith.io.refs recognise Orbax directories by it).
ORBAX_METADATA = "jaxarith.json"


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


def save_context(compress: bool = False) -> ocp.v1.Context:
    """The orbax context every jaxarith save runs in.

    ZSTD compression (orbax's default) is off unless asked: weights are high-entropy floats
    (random bfloat16 shrinks by ~25%, real checkpoints by less) and compressing made the HF ->
    Orbax write ~2.5x slower and the Orbax -> HF read slower still on this CPU.
    """
    ctx = ocp.v1.Context()
    ctx.array.saving.use_compression = compress
    return ctx


def _write_metadata(cfg: ModelConfig, directory: str, dtype: str, compress: bool) -> None:
    meta = {"format": FORMAT, "architecture": str(cfg.arch), "model_type": cfg.model_type,
            "dtype": dtype, "jaxarith_version": __version__, "layer_stacking": "stacked",
            "num_layers": cfg.num_hidden_layers, "params_dir": PARAMS_DIR,
            "compression": "zstd" if compress else "none",
            "orbax_checkpoint_version": ocp.__version__}
    with open(os.path.join(directory, ORBAX_METADATA), "w") as f:
        json.dump(meta, f, indent=2)


def _leaf_dtype(params) -> str:
    dtypes = {str(x.dtype) for x in jax.tree.leaves(params)}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"


def save_orbax(cfg: ModelConfig, params: dict, dst: str | os.PathLike, *,
               tokenizer_dir: str | None = None, overwrite: bool = False,
               compress: bool = False) -> str:
    """Save an in-memory canonical tree as a jaxarith Orbax checkpoint (atomically).

    Args:
      cfg: the model config (written as ``config.json``).
      params: the canonical tree (sharded ``jax.Array`` leaves keep their sharding as metadata).
      dst: output directory; it appears only when complete.
      tokenizer_dir: copy tokenizer / generation-config files from here.
      overwrite: replace an existing ``dst``.
      compress: ZSTD-compress the arrays (smaller, slower; see :func:`save_context`).
    Returns:
      ``dst``.
    """
    _check_tree(cfg, params)
    check_output_tree(params, os.fspath(dst))
    with atomic_dir(dst, overwrite=overwrite) as tmp, save_context(compress):
        ocp.v1.save_pytree(os.path.join(tmp, PARAMS_DIR), params)  # collective
        if distributed.is_primary():
            save_config(cfg, tmp)
            copy_side_files(tokenizer_dir, tmp)
            _write_metadata(cfg, tmp, _leaf_dtype(params), compress)
    return os.fspath(dst)


def _check_tree(cfg: ModelConfig, params: dict) -> None:
    """The tree must match the config leaf for leaf, so the checkpoint restores from it."""
    want = {"/".join(str(k.key) for k in p): a.shape
            for p, a in jax.tree_util.tree_leaves_with_path(abstract_params(cfg))}
    got = {"/".join(str(k.key) for k in p): tuple(x.shape)
           for p, x in jax.tree_util.tree_leaves_with_path(params)}
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    if missing or extra:
        raise CheckpointError(f"params do not match the {cfg.model_type} config: missing "
                              f"{missing[:5]}, unexpected {extra[:5]}")
    for name, shape in want.items():
        if got[name] != shape:
            raise CheckpointError(f"params {name}: shape {list(got[name])}, config expects "
                                  f"{list(shape)}")


def hf_to_orbax(src: str, dst: str | os.PathLike, *, dtype=None, mesh=None,
                overwrite: bool = False, progress: bool = True, compress: bool = False) -> str:
    """Stream an HF checkpoint into an Orbax one, one canonical tensor at a time.

    Each tensor is read from safetensors onto its sharding, saved with
    ``orbax.checkpoint.v1.partial.save`` and released before the next one, so host memory stays
    near the largest tensor; ``partial.finalize`` commits the checkpoint at the end.

    Args:
      src: HF hub id or local HF directory.
      dst: output directory; it appears only when complete.
      dtype: parameter dtype (default: the checkpoint's own).
      mesh: place (and record) each tensor on this mesh's sharding (default: one device).
      overwrite: replace an existing ``dst``.
      progress: show a progress bar.
      compress: ZSTD-compress the arrays (see :func:`save_context`).
    Returns:
      ``dst``.
    """
    directory = resolve_hf_dir(src)
    cfg = load_config(directory)
    dtypes = set()
    with atomic_dir(dst, overwrite=overwrite) as tmp, save_context(compress):
        target = os.path.join(tmp, PARAMS_DIR)
        # the next leaf is read and transposed while this one is saved
        for path, value in iter_hf_leaves(directory, cfg, mesh=mesh, dtype=dtype,
                                          progress=progress, ahead=1):
            check_output(value, "/".join(path), os.fspath(dst))  # a cast may overflow
            tree: dict = {}
            set_path(tree, path, value)
            ocp.v1.partial.save(target, tree)
            dtypes.add(str(value.dtype))
            del tree, value
        ocp.v1.partial.finalize(target)
        if distributed.is_primary():
            save_config(cfg, tmp)
            copy_side_files(directory, tmp)
            _write_metadata(cfg, tmp, dtypes.pop() if len(dtypes) == 1 else "mixed", compress)
    return os.fspath(dst)


def read_metadata(ref: str | os.PathLike) -> dict:
    """The checkpoint's ``jaxarith.json`` record, checked for a known format."""
    path = os.path.join(os.fspath(ref), ORBAX_METADATA)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable jaxarith metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def _abstract(cfg: ModelConfig, ref: str, mesh, dtype, stored=None) -> dict:
    """Abstract target: shapes from the config, dtype as stored unless asked, shardings."""
    stored = stored if stored is not None else stored_arrays(ref)

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


def _abs(ref: str | os.PathLike) -> str:
    """Orbax refuses relative checkpoint paths (its metadata read silently returns None)."""
    return os.path.abspath(os.fspath(ref))


def stored_arrays(ref: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"layers/attn/q": (shape, dtype)} as recorded in the checkpoint's metadata."""
    ref = _abs(ref)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            meta = ocp.v1.pytree_metadata(os.path.join(ref, PARAMS_DIR)).metadata
    except Exception as e:  # missing/damaged params dir: name it
        raise CheckpointError(f"{ref}: cannot read the Orbax array metadata ({e})") from e
    if not meta:
        raise CheckpointError(f"{ref}: the Orbax checkpoint has no array metadata")
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
    ref = _abs(ref)
    read_metadata(ref)
    cfg = load_config(ref)
    target = _abstract(cfg, ref, mesh, dtype)
    if paths is not None:
        sub: dict = {}
        for p in paths:
            set_path(sub, p, get_path(target, p))
        target = sub
    return cfg, _restore(ref, target, partial=paths is not None)


def _restore(ref: str, target: dict, *, partial: bool, primary_only: bool = False) -> dict:
    """``ocp.v1.load_pytree`` with its storage errors turned into one CheckpointError
    (``primary_only``: run by process 0 alone, its barriers over process 0 only)."""
    ctx = ocp.v1.Context()
    ctx.pytree.loading.partial_load = partial
    if primary_only and distributed.process_count() > 1:
        ctx.multiprocessing.primary_host = 0
        ctx.multiprocessing.active_processes = {0}
    try:
        with ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            tree = ocp.v1.load_pytree(os.path.join(ref, PARAMS_DIR), target)
    except Exception as e:  # tensorstore / orbax errors: name the checkpoint, keep the cause
        names = ["/".join(str(k.key) for k in p) for p, _ in
                 jax.tree_util.tree_leaves_with_path(target, is_leaf=lambda x: hasattr(x, "shape"))]
        cause = innermost_cause(e)
        raise CheckpointError(f"{ref}: cannot restore {', '.join(names[:4])}"
                              f"{' ...' if len(names) > 4 else ''} from the Orbax checkpoint "
                              f"({cause})") from e
    check_input_tree(tree, ref)
    return tree


@dataclasses.dataclass(frozen=True)
class HostArray:
    """Abstract leaf without a sharding: orbax restores it as a host ``np.ndarray``."""

    shape: tuple[int, ...]
    dtype: np.dtype


def load_host_leaves(ref: str | os.PathLike, paths: list[tuple[str, ...]], *, dtype=None,
                     stored: dict | None = None,
                     primary_only: bool = False) -> dict[tuple[str, ...], np.ndarray]:
    """Restore some canonical leaves as numpy arrays on the host (no device copy).

    Args:
      ref: a jaxarith Orbax checkpoint directory.
      paths: canonical leaves, e.g. ``[("layers", "mlp", "up")]``.
      dtype: cast to this dtype on restore (default: as stored).
      stored: :func:`stored_arrays` of ``ref``, when the caller already has it.
      primary_only: a multi-process run where process 0 alone calls this (an Orbax restore is
        otherwise a collective every process must join).
    Returns:
      {path: array}.
    """
    ref = _abs(ref)
    stored = stored if stored is not None else stored_arrays(ref)
    target: dict = {}
    for p in paths:
        name = "/".join(p)
        if name not in stored:
            raise CheckpointError(f"{ref}: tensor {name} missing from the Orbax checkpoint")
        shape, stored_dtype = stored[name]
        set_path(target, p, HostArray(tuple(shape), np.dtype(dtype or stored_dtype)))
    tree = _restore(ref, target, partial=True, primary_only=primary_only)
    return {p: get_path(tree, p) for p in paths}


def orbax_source(ref: str, *, dtype=None):
    """A leaf source for :func:`jaxarith.io.convert.export.save_hf`: host leaves on demand.

    In a multi-process run process 0 alone reads them (an Orbax restore over process 0 only):
    the HF writer needs no collective for host arrays, so the other processes read nothing.
    """
    ref = _abs(ref)
    read_metadata(ref)
    stored = stored_arrays(ref)
    alone = distributed.process_count() > 1

    def source(paths):
        return load_host_leaves(ref, paths, dtype=dtype, stored=stored, primary_only=alone)

    source.dtypes = {tuple(name.split("/")): jnp.dtype(dtype or d)
                     for name, (_, d) in stored.items()}  # per leaf, as stored unless cast
    source.host_only = True  # see write_hf: processes other than 0 never call it
    return source
