"""Export the canonical tree as an HF checkpoint, one tensor at a time; the one HF writer.

:func:`write_hf` is the only code that writes HF checkpoints (shard plan, safetensors files,
index, config, side files, atomically); :func:`save_hf` feeds it from canonical params, an Orbax
checkpoint or another HF checkpoint, and the streamed merge executor from its results. Tensors
are gathered and written one after another into safetensors shards (split at
``max_shard_size``) with a ``model.safetensors.index.json``; stacked layers, tied embeddings and
GPT-2's fused Conv1D ``c_attn`` are undone by the keymap's ``to_hf`` hooks, so the output loads in
``transformers.AutoModelForCausalLM.from_pretrained`` with no missing or unexpected keys.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxarith import distributed
from jaxarith.errors import ConfigError
from jaxarith.io.atomic import atomic_dir
from jaxarith.io.convert import pipeline
from jaxarith.io.convert.fastcopy import contiguous
from jaxarith.io.convert.hf import INDEX_FILE, SINGLE_FILE, HFCheckpoint, check_checkpoint, get_path
from jaxarith.io.convert.keymap import Rule, expand, rules_for
from jaxarith.io.convert.orbax import copy_side_files
from jaxarith.io.convert.safetensors_io import write_safetensors
from jaxarith.models.config import ModelConfig, save_config

Path = tuple[str, ...]
# The canonical per-layer arrays of one keymap rule's targets at one layer (None: not stacked).
SliceSource = Callable[[Rule, int | None], tuple[np.ndarray, ...]]
# Returns the arrays of the requested canonical leaves (e.g. restored from Orbax on demand).
LeafSource = Callable[[list[Path]], dict[Path, jax.Array]]
TensorSpec = tuple[str, tuple[int, ...], np.dtype]  # (HF name, shape, dtype)

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """``"5GB"`` -> 5e9 bytes (HF's convention: KB/MB/GB are powers of 10, KiB/MiB/GiB of 2)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B)?\s*", size.upper())
    if not m:
        raise ConfigError(f"max_shard_size={size!r}: expected e.g. '5GB', '500MB' or bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "B"])


def leaf_slices(fetch: LeafSource) -> SliceSource:
    """Slices from whole canonical leaves fetched per rule (the last rule's leaves are kept).

    Leaves may be host ``np.ndarray`` (restored from Orbax: a layer is a view) or ``jax.Array``
    (in memory: only the one layer is gathered to the host). The fetcher's ``dtypes`` attribute
    ({path: dtype}), when it has one, is passed on.
    """
    cache: dict = {}

    def slices(rule: Rule, layer: int | None) -> tuple[np.ndarray, ...]:
        if cache.get("rule") is not rule:
            cache.clear()
            cache.update(rule=rule, leaves=fetch(list(rule.targets)))
        leaves = cache["leaves"]
        # one layer at a time; gathered from every process in a multi-process run
        return tuple(distributed.to_host(leaves[t] if layer is None else leaves[t][layer])
                     for t in rule.targets)

    slices.dtypes = getattr(fetch, "dtypes", None)
    slices.host_only = getattr(fetch, "host_only", False)
    return slices


def hf_slices(directory: str, cfg: ModelConfig) -> SliceSource:
    """Per-layer canonical arrays read straight from an HF checkpoint, one HF tensor at a time.

    For HF -> HF re-sharding and dtype casts without jax: ``to_hf`` undoes ``to_canon`` as views,
    so host memory stays at one HF tensor. Keys and shapes are checked before anything is read.
    ``slices.dtypes`` gives each canonical leaf's stored dtype.
    """
    ckpt = HFCheckpoint(directory)
    names = check_checkpoint(cfg, ckpt)

    def slices(rule: Rule, layer: int | None) -> tuple[np.ndarray, ...]:
        key = rule.key(layer)
        return tuple(rule.to_canon(ckpt.get(names[key])))

    slices.dtypes = {t: ckpt.dtype(names[expand(rule, cfg.num_hidden_layers)[0][0]])
                     for rule in rules_for(cfg) for t in rule.targets}
    slices.host_only = True  # files read on the host: no collective (see write_hf)
    return slices


def memory_slices(params: dict) -> SliceSource:
    """Per-layer slices of an in-memory canonical tree (``dtypes``: each leaf's own)."""
    fetch = lambda paths: {p: get_path(params, p) for p in paths}
    fetch.dtypes = {tuple(str(k.key) for k in kp): np.dtype(x.dtype)
                    for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    return leaf_slices(fetch)


def _hf_tensors(cfg: ModelConfig, slices: SliceSource,
                dtypes: list[np.dtype]) -> Iterator[np.ndarray]:
    """The HF tensors, each built (fetched, transposed, cast) one ahead on a worker thread while
    the writer writes the previous one (single-process runs; a multi-process run gathers each
    tensor collectively, in step on every process)."""
    return pipeline.ahead(_build_hf_tensors(cfg, slices, dtypes),
                          1 if jax.process_count() == 1 else 0)


def _build_hf_tensors(cfg: ModelConfig, slices: SliceSource,
                      dtypes: list[np.dtype]) -> Iterator[np.ndarray]:
    i = 0
    for rule in rules_for(cfg):
        for _, layer in expand(rule, cfg.num_hidden_layers):
            # to_hf is mostly a transpose: copy it through cache-sized tiles.
            yield contiguous(np.asarray(rule.to_hf(*slices(rule, layer))), dtypes[i])
            i += 1


def plan_shards(specs: list[TensorSpec], limit: int) -> list[list[int]]:
    """Indices of ``specs`` per safetensors file, in order, each file at most ``limit`` bytes
    (a single larger tensor gets a file of its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dt) in enumerate(specs):
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def _config_dtype(specs: list[TensorSpec]) -> str:
    """config.json's ``dtype``: the one dtype, or for a mixed checkpoint the one holding most
    bytes (as transformers writes a bf16 model with float32 norms)."""
    by: dict[np.dtype, int] = {}
    for _, shape, dt in specs:
        by[np.dtype(dt)] = by.get(np.dtype(dt), 0) + \
            int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
    return max(by, key=by.get).name


def write_hf(
    cfg: ModelConfig,
    dst: str | os.PathLike,
    specs: list[TensorSpec],
    tensors: Iterator[np.ndarray],
    *,
    max_shard_size: str | int = "5GB",
    tokenizer_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "export",
    host_only: bool = False,
) -> dict:
    """THE writer of HF checkpoints (every route: convert, merge, delta, training exports).

    Writes ``tensors`` (yielded in ``specs`` order, one at a time) into safetensors shards of at
    most ``max_shard_size``, the index when there are several, ``config.json`` (with the dtype),
    tokenizer and generation-config files from ``tokenizer_dir`` (a generation config from the
    model config when there is none), all into ``dst`` atomically.

    In a multi-process run every process calls it (each tensor is gathered from all processes,
    one at a time, so no host ever holds the whole model) and process 0 alone writes.

    Args:
      specs: (HF name, shape, dtype) of every tensor, in file order.
      host_only: the tensors are computed on the host without any collective (read from files,
        an average of files): in a multi-process run only process 0 builds them (the others
        would read every input only to discard it).
    Returns:
      {"files", "tensors", "bytes" (tensor data), "bytes_written" (files, with headers)}.
    """

    shards = plan_shards(specs, parse_size(max_shard_size))
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    nbytes = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, s, d in specs)
    primary = distributed.is_primary()
    bar = tqdm(total=len(specs), desc=desc, unit="tensor", disable=not progress or not primary,
               leave=False)
    written = 0
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        if not primary:
            # multi-process: every process takes part in gathering each tensor (a collective,
            # one tensor at a time); process 0 alone writes the files
            if not host_only:
                for _ in _take(tensors, len(specs), bar):
                    pass
        else:
            written = _write_files(cfg, tmp, specs, shards, names, nbytes, tensors, bar,
                                   tokenizer_dir)
    bar.close()
    return {"files": names, "tensors": len(specs), "bytes": nbytes, "bytes_written": written}


def _write_files(cfg: ModelConfig, tmp: str, specs: list[TensorSpec], shards: list[list[int]],
                 names: list[str], nbytes: int, tensors: Iterator[np.ndarray], bar,
                 tokenizer_dir: str | None) -> int:
    """Write the safetensors shards, index, config and side files into ``tmp``; returns the
    bytes written."""
    written = 0
    weight_map = {}
    for name, idx in zip(names, shards, strict=True):
        part = [specs[i] for i in idx]
        written += write_safetensors(os.path.join(tmp, name), part,
                                     _take(tensors, len(idx), bar))
        weight_map.update({k: name for k, _, _ in part})
    if len(shards) > 1:
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": nbytes}, "weight_map": weight_map},
                      f, indent=2)
    hf = cfg.to_hf()
    hf["torch_dtype"] = hf["dtype"] = _config_dtype(specs)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    copied = copy_side_files(tokenizer_dir, tmp)
    if "generation_config.json" not in copied and cfg.bos_token_id is not None:
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
               "pad_token_id": cfg.pad_token_id}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({k: v for k, v in gen.items() if v is not None}, f, indent=2)
    return written


def _take(it: Iterator[np.ndarray], n: int, bar) -> Iterator[np.ndarray]:
    for _ in range(n):
        yield next(it)
        bar.update()


def save_hf(
    cfg: ModelConfig,
    params: dict | None,
    dst: str | os.PathLike,
    *,
    source: LeafSource | None = None,
    slices: SliceSource | None = None,
    dtype=None,
    max_shard_size: str | int = "5GB",
    tokenizer_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write an HF model directory (atomically) from canonical params or a leaf source.

    Args:
      params: the canonical tree in memory; or None with ``source`` giving whole leaves on
        demand, or ``slices`` giving per-layer slices (e.g. read from an HF checkpoint).
      dtype: output dtype of every tensor; default: each tensor keeps its own dtype (a bf16
        model with float32 norms stays so), read from ``params`` or the source's ``dtypes``.
      max_shard_size: split safetensors files at this size (``"5GB"``, ``"500MB"``, bytes).
      tokenizer_dir: copy tokenizer / generation-config files from here.
    Returns:
      {"files": [...], "tensors": n, "bytes": total, "bytes_written": with headers}.
    """
    if slices is None:
        if source is None and params is None:
            raise ValueError("save_hf needs params, a source or slices")
        slices = memory_slices(params) if source is None else leaf_slices(source)
    leaf_dtypes = getattr(slices, "dtypes", None)
    if dtype is None and leaf_dtypes is None:
        raise ValueError("save_hf: the source has no `dtypes`; pass dtype=")
    specs = []
    for rule in rules_for(cfg):
        dt = np.dtype(dtype) if dtype is not None else \
            np.result_type(*(leaf_dtypes[t] for t in rule.targets))
        for key, _ in expand(rule, cfg.num_hidden_layers):
            specs.append((key, rule.hf_shape, dt))
    tensors = _hf_tensors(cfg, slices, [d for _, _, d in specs])
    info = write_hf(cfg, dst, specs, tensors, max_shard_size=max_shard_size,
                    tokenizer_dir=tokenizer_dir, overwrite=overwrite, progress=progress,
                    host_only=getattr(slices, "host_only", False))
    return info


__all__ = ["parse_size", "plan_shards", "save_config", "save_hf", "write_hf"]
