"""Training run directories as sources of checkpoints: recognise one, list its train-state
checkpoints by step, and read their parameters one canonical tensor at a time.

A run directory is what ``python -m train`` writes to ``out``::

    OUT/
      config.json        the train config (not an HF config: it has ``steps`` and ``model``)
      checkpoints/<step>/state/   the whole TrainState (params, optimizer, average, step)
      ...                metrics.jsonl, summary.json, loss.png

Only ``state/params`` is read, and only the requested leaves (orbax partial restore to host
arrays), so averaging checkpoints of a run never loads optimizer moments or a whole model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import numpy as np

from jaxarith.errors import CheckpointError
from jaxarith.io.convert.hf import get_path, resolve_hf_dir, set_path
from jaxarith.io.convert.orbax import HostArray
from jaxarith.io.refs import RefKind, ref_kind
from jaxarith.models.config import ModelConfig, config_from_hf, load_config

CHECKPOINTS = "checkpoints"
STATE = "state"


def is_run_dir(path: str | os.PathLike) -> bool:
    """True for a training run directory (its ``config.json`` is a train config)."""
    path = os.fspath(path)
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and "model_type" not in raw and "steps" in raw \
        and isinstance(raw.get("model"), dict)


@dataclasses.dataclass(frozen=True)
class Run:
    """A training run directory.

    Attributes:
      directory: the run's ``out``.
      train_config: its ``config.json`` as a dict.
      checkpoint_dir: where its step checkpoints live.
    """

    directory: str
    train_config: dict
    checkpoint_dir: str

    @classmethod
    def open(cls, path: str | os.PathLike) -> Run:
        path = os.path.abspath(os.fspath(path))
        if not is_run_dir(path):
            raise CheckpointError(f"{path}: not a training run directory (no train config.json)")
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        ckpt_dir = (raw.get("checkpoint") or {}).get("dir") or os.path.join(path, CHECKPOINTS)
        return cls(path, raw, os.path.abspath(ckpt_dir))

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending (orbax's temporary dirs are skipped)."""
        if not os.path.isdir(self.checkpoint_dir):
            return []
        return sorted(int(n) for n in os.listdir(self.checkpoint_dir)
                      if n.isdigit() and os.path.isdir(os.path.join(self.checkpoint_dir, n, STATE)))

    def model_config(self) -> ModelConfig:
        """The trained model's config: from ``model.ref`` or the scratch ``arch`` + ``config``."""
        m = self.train_config["model"]
        if m.get("ref"):
            ref = m["ref"]
            if ref_kind(ref) is not RefKind.ORBAX:
                ref = resolve_hf_dir(ref)
            return load_config(ref)
        return config_from_hf({"model_type": m["arch"], **(m.get("config") or {})})

    def tokenizer_source(self) -> str:
        """``bundled`` or a directory holding the run's tokenizer files."""
        m = self.train_config["model"]
        tok = m.get("tokenizer") or m.get("ref") or "bundled"
        if tok != "bundled" and not os.path.isdir(tok):
            tok = resolve_hf_dir(tok)
        return tok

    def step_dir(self, step: int) -> str:
        return os.path.join(self.checkpoint_dir, str(step))

    def stored(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """{"layers/attn/q": (shape, dtype)} of the step's parameters."""
        import orbax.checkpoint as ocp

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                meta = ocp.v1.pytree_metadata(self.step_dir(step),
                                              checkpointable_name=STATE).metadata
            params = meta["params"]
        except Exception as e:
            raise CheckpointError(f"{self.step_dir(step)}: cannot read the train-state "
                                  f"metadata ({type(e).__name__}: {e})") from e
        import jax

        out = {}
        for path, leaf in jax.tree_util.tree_leaves_with_path(
                params, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")):
            out["/".join(str(k.key) for k in path)] = (tuple(leaf.shape),
                                                       str(np.dtype(leaf.dtype)))
        return out

    def read_params(self, step: int, paths: list[tuple[str, ...]],
                    stored: dict | None = None) -> dict[tuple[str, ...], np.ndarray]:
        """Restore some parameter leaves of a step's train state as host numpy arrays."""
        import orbax.checkpoint as ocp

        stored = stored if stored is not None else self.stored(step)
        target: dict = {}
        for p in paths:
            name = "/".join(p)
            if name not in stored:
                raise CheckpointError(f"{self.step_dir(step)}: parameter {name} missing from "
                                      "the train state")
            shape, dtype = stored[name]
            set_path(target, p, HostArray(tuple(shape), np.dtype(dtype)))
        ctx = ocp.v1.Context()
        ctx.pytree.loading.partial_load = True
        try:
            with ctx, warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                tree = ocp.v1.load_pytree(self.step_dir(step), {"params": target},
                                          checkpointable_name=STATE)
        except Exception as e:
            raise CheckpointError(f"{self.step_dir(step)}: cannot restore "
                                  f"{', '.join('/'.join(p) for p in paths[:4])} "
                                  f"({type(e).__name__}: {e})") from e
        return {p: get_path(tree["params"], p) for p in paths}
