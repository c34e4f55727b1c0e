"""Load HF safetensors checkpoints into the canonical tree, streamed and sharded.

Every canonical tensor is built from its HF tensors one at a time and placed straight onto its
final sharding: for each distinct shard of the tensor that this process's devices hold, a host
buffer is filled layer by layer (one HF tensor read per layer) and put on those devices. Host
memory therefore stays near one canonical tensor plus one HF tensor, and a process reads only
the slices its devices hold.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxarith import sharding
from jaxarith.configfile import load_json
from jaxarith.errors import (
    CheckpointError,
    ConfigError,
    JaxarithError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from jaxarith.io.convert import pipeline
from jaxarith.io.convert.fastcopy import aligned_empty, copy_into
from jaxarith.io.convert.keymap import Rule, expand, ignorable, normalize_key, rules_for
from jaxarith.io.convert.safetensors_io import SafetensorsFile
from jaxarith.models.config import ModelConfig, load_config
from jaxarith.models.transformer import param_specs

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


def resolve_hf_dir(ref: str | os.PathLike, patterns: list[str] | None = None) -> str:
    """A local directory for an HF model reference: the directory itself, or a hub snapshot
    (of the files matching ``patterns``; default: config, tokenizer and weights). A
    ``MODEL+ADAPTER`` reference is the model with the LoRA adapter merged (cached, see
    :mod:`jaxarith.io.convert.lora`)."""
    ref = os.fspath(ref)
    if os.path.isdir(ref):
        return ref
    from jaxarith.io.convert import lora  # lora imports this module

    if lora.split_ref(ref) is not None:
        return lora.materialize(ref)
    if os.path.exists(ref) or ref.startswith((".", "/")) or ref.count("/") > 1:
        raise JaxarithError(f"model reference {ref!r} is not a directory nor a hub id")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(ref, allow_patterns=patterns or HF_ALLOW_PATTERNS)
    except Exception as e:  # network, auth, unknown repo: say which reference failed
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise JaxarithError(
            f"could not fetch {ref!r} from the Hugging Face hub ({type(e).__name__}: {reason}); "
            f"there is no local directory {os.path.abspath(ref)} either (a local path needs to "
            "exist; hub ids look like 'org/name')") from e


class HFCheckpoint:
    """The safetensors files of one HF model directory, with a tensor name -> file map."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index):
            try:
                weight_map = load_json(index, "safetensors index")["weight_map"]
            except (KeyError, TypeError, ConfigError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict) or \
                    not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard "
                                      "file names")
            files = sorted(set(weight_map.values()))
            for f in files:  # names only: HF cache snapshots hold symlinks to elsewhere
                if not f or os.path.isabs(f) or ".." in f.replace("\\", "/").split("/"):
                    raise CheckpointError(f"{index}: shard {f[:200]!r} is outside the model "
                                          "directory; shard names must be files in it")
            missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
            if missing:
                raise CheckpointError(f"{index} lists shard files that do not exist: {missing}")
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            files, weight_map = [SINGLE_FILE], None
        else:
            raise CheckpointError(
                f"{directory}: no {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints "
                "are read)"
            )
        self.files = {f: SafetensorsFile(os.path.join(directory, f)) for f in files}
        self.where: dict[str, str] = {}
        for fname, st in self.files.items():
            for key in st.keys():
                self.where[key] = fname
        if weight_map is not None:
            absent = [k for k, f in weight_map.items() if k not in self.files[f].keys()]
            if absent:
                raise CheckpointError(f"{index} lists tensors absent from their shard: "
                                      f"{absent[:5]}")

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.files[self.where[key]].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self.files[self.where[key]].dtype(key)

    def get(self, key: str) -> np.ndarray:
        return self.files[self.where[key]].get(key)

    def view(self, key: str) -> np.ndarray:
        """A read-only memory-mapped view of the tensor (see :meth:`SafetensorsFile.view`)."""
        return self.files[self.where[key]].view(key)


def check_checkpoint(cfg: ModelConfig, ckpt: HFCheckpoint) -> dict[str, str]:
    """Check every key and shape; return {expected HF key: key as stored}.

    Raises:
        MissingTensorError, UnexpectedTensorError, ShapeMismatchError: naming the tensors.
    """
    stored = {normalize_key(cfg, k): k for k in ckpt.keys()}
    expected: dict[str, tuple[int, ...]] = {}
    for rule in rules_for(cfg):
        for key, _ in expand(rule, cfg.num_hidden_layers):
            expected[key] = rule.hf_shape
    missing = [k for k in expected if k not in stored]
    if missing:
        raise MissingTensorError(
            f"{ckpt.directory}: {len(missing)} tensor(s) missing from the checkpoint: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    unexpected = [v for k, v in stored.items() if k not in expected and not ignorable(cfg, k)]
    if unexpected:
        raise UnexpectedTensorError(
            f"{ckpt.directory}: {len(unexpected)} unexpected tensor(s) for a "
            f"{cfg.model_type} model: {', '.join(sorted(unexpected)[:8])}"
        )
    for key, shape in expected.items():
        actual = ckpt.shape(stored[key])
        if actual != shape:
            raise ShapeMismatchError(
                f"{stored[key]}: expected shape {list(shape)} from config.json, "
                f"checkpoint has {list(actual)}"
            )
    return {k: stored[k] for k in expected}


def _canon_leaves(cfg: ModelConfig) -> Iterator[tuple[tuple[str, ...], Rule, int]]:
    """(canonical path, the rule that produces it, its output position) for every leaf."""
    for rule in rules_for(cfg):
        for j, target in enumerate(rule.targets):
            yield target, rule, j


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def iter_hf_leaves(
    directory: str,
    cfg: ModelConfig,
    *,
    mesh: jax.sharding.Mesh | None = None,
    dtype=None,
    strict_sharding: bool | None = None,
    progress: bool = True,
    ahead: int = 0,
) -> Iterator[tuple[tuple[str, ...], jax.Array]]:
    """Yield (canonical path, array on its final sharding) one tensor at a time.

    The checkpoint is fully checked (keys and shapes) before the first tensor is read.

    Args:
      ahead: build this many leaves in advance on a worker thread while the caller uses the
        current one (a streamed conversion: reading and transposing overlap the writing). Their
        host buffers are then aligned so that putting them on a CPU device aliases them
        instead of copying, so the extra leaf costs no more memory than that copy did.
    """
    yield from pipeline.ahead(_hf_leaves(directory, cfg, mesh, dtype, strict_sharding, progress,
                                         aligned=ahead > 0), ahead)


def _hf_leaves(directory, cfg, mesh, dtype, strict_sharding, progress, aligned):
    ckpt = HFCheckpoint(directory)
    names = check_checkpoint(cfg, ckpt)
    specs = param_specs(cfg)
    leaves = list(_canon_leaves(cfg))
    for path, rule, j in tqdm(leaves, desc="load", unit="tensor", disable=not progress,
                              leave=False):
        spec = get_path(specs, path)
        first = names[expand(rule, cfg.num_hidden_layers)[0][0]]
        leaf_dtype = np.dtype(dtype) if dtype is not None else ckpt.dtype(first)
        if mesh is None:
            shd = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            shd = sharding.named_sharding(mesh, spec.axes, spec.shape, name="/".join(path),
                                          strict=strict_sharding)
        yield path, _place(ckpt, names, cfg, rule, j, spec.shape, leaf_dtype, shd, aligned)


def load_hf_params(
    ref: str | os.PathLike,
    cfg: ModelConfig | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    dtype=None,
    strict_sharding: bool | None = None,
    progress: bool = True,
) -> tuple[ModelConfig, dict]:
    """Load an HF checkpoint (local directory or hub id) into the canonical parameter tree.

    Args:
      ref: local HF directory or hub id.
      cfg: the model config; read from ``config.json`` when omitted.
      mesh: place each tensor with its final sharding on this mesh (default: one device).
      dtype: parameter dtype (default: the checkpoint's own dtype, per tensor).
      strict_sharding: raise instead of replicating a dimension that does not divide its mesh
        axes (default: :func:`jaxarith.sharding.is_strict`).
    Returns:
      (config, params).
    """
    directory = resolve_hf_dir(ref)
    cfg = cfg or load_config(directory)
    params: dict = {}
    for path, value in iter_hf_leaves(directory, cfg, mesh=mesh, dtype=dtype,
                                      strict_sharding=strict_sharding, progress=progress):
        set_path(params, path, value)
    return cfg, params


def _place(ckpt, names, cfg, rule: Rule, j: int, shape, dtype, shd,
           aligned: bool = False) -> jax.Array:
    """Build one canonical tensor on its sharding, reading each HF tensor once (a memory-mapped
    view, copied straight into the leaf's buffer; ``aligned``: buffers jax can alias)."""
    index_map = shd.addressable_devices_indices_map(tuple(shape))
    groups: dict[tuple, list] = {}
    for device, index in index_map.items():
        key = tuple((s.start, s.stop, s.step) for s in index)
        groups.setdefault(key, [index, []])[1].append(device)
    empty = aligned_empty if aligned else np.empty
    bufs = {key: empty(_slice_shape(idx, shape), dtype) for key, (idx, _) in groups.items()}
    for hf_key, layer in expand(rule, cfg.num_hidden_layers):
        value = np.asarray(rule.to_canon(ckpt.view(names[hf_key]))[j])  # cast by copy_into
        lead = () if layer is None else layer if isinstance(layer, tuple) else (layer,)
        n = len(lead)
        for key, (index, _) in groups.items():
            # the slice of this HF tensor in the leaf: leading (layer[, expert]) indices
            bounds = [index[d].indices(shape[d])[:2] for d in range(n)]
            if all(lo <= i < hi for i, (lo, hi) in zip(lead, bounds, strict=True)):
                at = tuple(i - lo for i, (lo, _) in zip(lead, bounds, strict=True))
                # tiled: value is often a transpose
                copy_into(bufs[key][at] if at else bufs[key], value[index[n:]])
    arrays = []
    for key, (_, devices) in groups.items():
        for d in devices:
            arrays.append(jax.device_put(bufs[key], d))
    del bufs
    order = {d: i for i, d in enumerate(index_map)}
    arrays.sort(key=lambda a: order[next(iter(a.devices()))])
    return jax.make_array_from_single_device_arrays(tuple(shape), shd, arrays)


def _slice_shape(index, shape) -> tuple[int, ...]:
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True))


def params_to_hf_tensors(cfg: ModelConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, numpy array) one tensor at a time from a canonical tree (for export)."""
    for rule in rules_for(cfg):
        for hf_key, layer in expand(rule, cfg.num_hidden_layers):
            parts = []
            for target in rule.targets:
                leaf = get_path(params, target)
                parts.append(np.asarray(jax.device_get(leaf[layer] if layer is not None
                                                      else leaf)))
            yield hf_key, rule.to_hf(*parts)
