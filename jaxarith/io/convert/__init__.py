"""Checkpoint conversion: HF safetensors <-> canonical parameters (<-> Orbax)."""

from jaxarith.io.convert.hf import (
    HFCheckpoint,
    load_hf_params,
    params_to_hf_tensors,
    resolve_hf_dir,
)

__all__ = ["HFCheckpoint", "load_hf_params", "params_to_hf_tensors", "resolve_hf_dir"]
