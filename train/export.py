"""End-of-run export: the final (or averaged) weights as an HF model, optionally plus a delta.

``final = trained + (delta_tuned - delta_base)`` is the instruct-transplant recipe: continue
pre-training a base model on new data, then re-add the instruction-tuning delta. The delta uses
:mod:`jaxarith.arith` (``delta`` / ``apply_delta``, float32 math) and the writer is
:func:`jaxarith.io.convert.export.save_hf` (atomic, sharded safetensors).
"""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp

from jaxarith import arith
from jaxarith.data.assets import bundled_tokenizer
from jaxarith.errors import ConfigError
from jaxarith.io import paths
from jaxarith.io.atomic import protect_inputs
from jaxarith.io.convert.export import save_hf
from jaxarith.io.refs import load_model
from jaxarith.models.config import ModelConfig


def export_params(cfg, state) -> dict:
    """The tree to export: the average when asked (and present), else the final params."""
    if cfg.export.use_average:
        if state.average is None:
            raise ConfigError("export.use_average is set but average.kind is none")
        return state.average.value()
    return state.params


def add_delta(params: dict, model_cfg: ModelConfig, tuned_ref: str, base_ref: str, mesh=None):
    """``params + (tuned - base)`` with both references loaded onto ``mesh``."""
    tuned = load_model(tuned_ref, mesh=mesh, dtype=jnp.float32, progress=False)
    base = load_model(base_ref, mesh=mesh, dtype=jnp.float32, progress=False)
    for name, m in (("delta_tuned", tuned), ("delta_base", base)):
        if m.config != model_cfg:
            raise ConfigError(f"export.{name}: {m.directory} has a different architecture "
                              "than the trained model")
    tau = arith.delta(tuned.params, base.params, model_cfg)
    return arith.apply_delta(params, tau, model_cfg)


def export_hf(cfg, model_cfg: ModelConfig, model_dir: str | None, state) -> str:
    """Write ``cfg.export.hf_dir`` (HF safetensors + config + tokenizer; a URL is written
    locally, then uploaded by :func:`jaxarith.io.paths.upload_dir`). Returns the path."""
    ex = cfg.export
    params = export_params(cfg, state)
    mesh = jax.tree.leaves(params)[0].sharding.mesh if hasattr(
        jax.tree.leaves(params)[0].sharding, "mesh") else None
    if ex.delta_tuned:
        params = add_delta(params, model_cfg, ex.delta_tuned, ex.delta_base, mesh)
    tok_dir = model_dir
    with tempfile.TemporaryDirectory() as tmp:
        if not tok_dir or cfg.model.tokenizer == "bundled":
            bundled_tokenizer().save_pretrained(tmp)
            tok_dir = tmp
        elif cfg.model.tokenizer:
            tok_dir = cfg.model.tokenizer
        if paths.is_url(ex.hf_dir):  # written locally, then uploaded (marker last)
            paths.check_upload(ex.hf_dir, ex.overwrite)
            local = os.path.join(tmp, "hf")
            save_hf(model_cfg, params, local, dtype=ex.dtype or "float32",
                    tokenizer_dir=tok_dir, progress=False)
            if jax.process_index() == 0:
                paths.upload_dir(local, ex.hf_dir, kind="hf export", overwrite=ex.overwrite)
            return ex.hf_dir
        # the shared safe-output rules: never replace the run, the base model or the deltas
        with protect_inputs([cfg.out, model_dir, ex.delta_tuned, ex.delta_base]):
            save_hf(model_cfg, params, ex.hf_dir, dtype=ex.dtype or "float32",
                    tokenizer_dir=tok_dir, overwrite=ex.overwrite, progress=False)
    return os.path.abspath(ex.hf_dir)
