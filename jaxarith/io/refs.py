"""One resolver for model references: HF hub id, local HF directory, or Orbax checkpoint directory.

Every command takes a model reference and goes through this module, so all of them accept the
same three kinds:

- :func:`resolve` -> :class:`Ref` ``(kind, dir)``: the local directory that holds the model's
  ``config.json`` and tokenizer files (a hub id is downloaded to the HF cache first);
- :func:`load_config`: the model's :class:`~jaxarith.models.ModelConfig`, without its weights;
- :func:`load_model`: config and parameters, placed on a mesh;
- :func:`load_tokenizer`: the tokenizer saved next to the model.
"""

from __future__ import annotations

import dataclasses
import enum
import os

import jax

from jaxarith.errors import JaxarithError
from jaxarith.io.convert import lora
from jaxarith.io.convert import orbax as orbax_io
from jaxarith.io.convert.hf import load_hf_params, resolve_hf_dir
from jaxarith.io.convert.orbax import ORBAX_METADATA
from jaxarith.models import config as config_lib
from jaxarith.models.config import ModelConfig


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
    if lora.split_ref(ref) is not None:  # MODEL+ADAPTER: merged into an HF directory
        return RefKind.HF_DIR
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise JaxarithError(f"{ref}: no such directory")
    return RefKind.HF_HUB


@dataclasses.dataclass(frozen=True)
class Ref:
    """A resolved model reference: its kind and the local directory holding ``config.json``
    and the tokenizer files (the Orbax checkpoint itself, an HF directory, or the hub snapshot).
    """

    kind: RefKind
    dir: str


def resolve(ref: str | os.PathLike) -> Ref:
    """The kind of ``ref`` and its local directory (downloads a hub id's config and weights
    into the HF cache; see :func:`jaxarith.io.convert.hf.resolve_hf_dir`)."""
    kind = ref_kind(ref)
    return Ref(kind, os.fspath(ref) if kind is RefKind.ORBAX else resolve_hf_dir(ref))


def load_config(ref: str | os.PathLike) -> ModelConfig:
    """The model config of any model reference (no weights are read; from the hub, only
    ``config.json`` is downloaded)."""
    if ref_kind(ref) is RefKind.HF_HUB:
        return config_lib.load_config(resolve_hf_dir(ref, patterns=["config.json"]))
    return config_lib.load_config(resolve(ref).dir)


def load_model(
    ref: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    dtype=None,
    progress: bool = True,
) -> LoadedModel:
    """Resolve a model reference into (config, params) placed on ``mesh`` (one device if None)."""
    r = resolve(ref)
    if r.kind is RefKind.ORBAX:
        cfg, params = orbax_io.load_orbax(r.dir, mesh=mesh, dtype=dtype)
    else:
        cfg, params = load_hf_params(r.dir, mesh=mesh, dtype=dtype, progress=progress)
    return LoadedModel(cfg, params, r.kind, r.dir)


def load_tokenizer(ref: str | os.PathLike):
    """The tokenizer saved next to a model: ``ref`` is a model reference or its directory."""
    from transformers import AutoTokenizer

    directory = os.fspath(ref) if os.path.isdir(ref) else resolve(ref).dir
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        raise JaxarithError(f"{directory}: no usable tokenizer files ({e})") from e
