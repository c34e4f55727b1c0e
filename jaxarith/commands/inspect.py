"""``jaxarith inspect MODEL``: architecture, parameter count, and every tensor (name, shape, dtype).

Reads only metadata: safetensors headers for HF models, the array metadata of Orbax checkpoints
(with the sharding it was saved with).
"""

from __future__ import annotations

from jaxarith.commands import _common
from jaxarith.io.convert.hf import HFCheckpoint, resolve_hf_dir
from jaxarith.io.convert.orbax import PARAMS_DIR, read_metadata
from jaxarith.io.refs import RefKind, ref_kind
from jaxarith.models import load_config, num_params


def register(sub) -> None:
    p = sub.add_parser("inspect", help="architecture, parameter count and tensors of a model",
                       description=__doc__)
    p.add_argument("model", help="HF hub id, local HF directory or Orbax checkpoint directory")
    _common.add_json(p)
    p.set_defaults(handler=handle)


def sharding_info(meta) -> dict | None:
    """Orbax's saved sharding metadata as ``{"mesh": {"fsdp": 8, ...}, "spec": [...]}``."""
    if meta is None:
        return None
    if hasattr(meta, "partition_spec") and hasattr(meta, "axis_names"):
        mesh = dict(zip(meta.axis_names, (int(n) for n in meta.shape), strict=True))
        spec = [list(a) if isinstance(a, tuple) else a for a in meta.partition_spec]
        return {"mesh": mesh, "spec": spec}
    if hasattr(meta, "device_str"):
        return {"device": meta.device_str}
    return {"repr": str(meta)}


def _sharding_str(info: dict | None) -> str:
    if not info:
        return ""
    if "mesh" in info:
        mesh = ",".join(f"{k}={v}" for k, v in info["mesh"].items())
        return f"{mesh} {tuple(info['spec'])}"
    return info.get("device") or info.get("repr", "")


def inspect_model(ref: str) -> dict:
    """Metadata of a model reference: config facts and every stored tensor (no array reads).

    Args:
      ref: HF hub id, local HF directory or jaxarith Orbax checkpoint directory.
    Returns:
      {"model", "kind", "architecture", "model_type", "num_params", "stored_elements", "dtype",
      "metadata", "tensors": [{"name", "shape", "dtype", "file" | "sharding"}]}.
    """
    import numpy as np

    kind = ref_kind(ref)
    tensors = []
    if kind is RefKind.ORBAX:
        import os
        import warnings

        import jax
        import orbax.checkpoint as ocp

        directory = os.path.abspath(ref)  # orbax needs absolute paths
        meta = read_metadata(directory)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            tree = ocp.v1.pytree_metadata(os.path.join(directory, PARAMS_DIR)).metadata
        for path, leaf in jax.tree_util.tree_leaves_with_path(
                tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")):
            shd = getattr(leaf, "sharding_metadata", None) or getattr(leaf, "sharding", None)
            tensors.append({"name": "/".join(str(k.key) for k in path),
                            "shape": list(leaf.shape), "dtype": str(np.dtype(leaf.dtype)),
                            "sharding": sharding_info(shd)})
    else:
        directory = resolve_hf_dir(ref)
        meta = {}
        ckpt = HFCheckpoint(directory)
        for key in ckpt.keys():
            tensors.append({"name": key, "shape": list(ckpt.shape(key)),
                            "dtype": str(ckpt.dtype(key)), "file": ckpt.where[key]})
    cfg = load_config(directory)
    dtypes = sorted({t["dtype"] for t in tensors})
    return {"model": ref, "kind": str(kind), "architecture": str(cfg.arch),
            "model_type": cfg.model_type, "num_params": num_params(cfg),
            "stored_elements": int(sum(np.prod(t["shape"]) for t in tensors)),
            "dtype": dtypes[0] if len(dtypes) == 1 else "mixed", "metadata": meta,
            "tensors": tensors}


def handle(args) -> int:
    info = inspect_model(args.model)
    lines = [f"{info['model']}: {info['model_type']} ({info['kind']}), "
             f"{info['num_params']:,} parameters, {info['dtype']}"]
    width = max(len(t["name"]) for t in info["tensors"])
    for t in info["tensors"]:
        extra = _sharding_str(t["sharding"]) if "sharding" in t else t.get("file", "")
        lines.append(f"  {t['name']:<{width}}  {str(t['shape']):<22} {t['dtype']:<9} {extra}")
    _common.emit(args, info, "\n".join(lines))
    return 0
