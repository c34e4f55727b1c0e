"""One resolver for model references: HF hub id, local HF directory, or Orbax checkpoint directory.

Every command takes a model reference and calls :func:`load_model`, so all of them accept the same
three kinds.
"""

from __future__ import annotations

import dataclasses
import enum
import os

import jax

from jaxarith.errors import JaxarithError
from jaxarith.models.config import ModelConfig

# An Orbax checkpoint written by jaxarith holds this metadata record next to the arrays.
ORBAX_METADATA = "jaxarith.json"


class RefKind(enum.StrEnum):
    HF_DIR = "hf"
    HF_HUB = "hub"
    ORBAX = "orbax"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    params: dict
    kind: RefKind
    directory: str  # where config.json and tokenizer files live

    def tokenizer(self):
        return load_tokenizer(self.directory)


def ref_kind(ref: str | os.PathLike) -> RefKind:
    ref = os.fspath(ref)
    if os.path.isdir(ref):
        if os.path.exists(os.path.join(ref, ORBAX_METADATA)):
            return RefKind.ORBAX
        if os.path.exists(os.path.join(ref, "config.json")):
            return RefKind.HF_DIR
        raise JaxarithError(
            f"{ref}: neither an HF model directory (no config.json) nor a jaxarith Orbax "
            f"checkpoint (no {ORBAX_METADATA})"
        )
    if os.path.exists(ref):
        raise JaxarithError(f"{ref}: a model reference must be a directory or a hub id")
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise JaxarithError(f"{ref}: no such directory")
    return RefKind.HF_HUB


def load_model(
    ref: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    dtype=None,
    progress: bool = True,
) -> LoadedModel:
    """Resolve a model reference into (config, params) placed on ``mesh`` (one device if None)."""
    kind = ref_kind(ref)
    if kind is RefKind.ORBAX:
        from jaxarith.io.convert import orbax as orbax_io

        cfg, params = orbax_io.load_orbax(ref, mesh=mesh, dtype=dtype)
        return LoadedModel(cfg, params, kind, os.fspath(ref))
    from jaxarith.io.convert.hf import load_hf_params, resolve_hf_dir

    directory = resolve_hf_dir(ref)
    cfg, params = load_hf_params(directory, mesh=mesh, dtype=dtype, progress=progress)
    return LoadedModel(cfg, params, kind, directory)


def load_tokenizer(directory: str):
    """The tokenizer saved next to a model (an HF directory or an Orbax checkpoint)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        raise JaxarithError(f"{directory}: no usable tokenizer files ({e})") from e
