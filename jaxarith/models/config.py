"""Model configurations: reading and writing HF ``config.json`` for any registered family.

Each family has one frozen dataclass with exactly the fields its forward pass uses (see
:mod:`jaxarith.models.family`). ``from_hf`` reads an HF config dict (both the transformers 4.x
``rope_theta``/``rope_scaling`` form and the 5.x ``rope_parameters`` form) and refuses keys it
does not know; ``to_hf`` writes one back: the original dict is kept (outside equality and hashing)
and the fields the model uses are written over it, so a round trip is lossless.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxarith.configfile import load_json
from jaxarith.errors import ConfigError
from jaxarith.models.family import Arch, DType, ModelConfig
from jaxarith.models.layers import RopeScaling, RopeType
from jaxarith.models.registry import config_classes, family, family_for_model_type

__all__ = ["Arch", "DType", "ModelConfig", "RopeScaling", "RopeType", "config_from_hf",
           "check_config_keys", "load_config", "save_config"]


def __getattr__(name: str):
    # ``from jaxarith.models.config import LlamaConfig`` keeps working without this module
    # naming any family.
    classes = config_classes()
    if name in classes:
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """Build the family config for an HF ``config.json`` dict.

    Raises:
        UnsupportedArchitectureError: ``model_type`` is missing or not implemented.
        ConfigError: a key the family neither reads nor knowingly ignores, or a bad value.
    """
    return family_for_model_type(d.get("model_type")).config_class.from_hf(d)


def check_config_keys(arch: Arch | str, d: dict[str, Any], where: str = "model.config") -> None:
    """Raise :class:`ConfigError` naming each key of ``d`` that ``arch``'s config does not know
    (for config overrides such as a training config's ``model.config``, before work starts)."""
    family(arch).config_class.check_keys(d, where)


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read ``config.json`` (a file or the directory holding it)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")

    try:
        d = load_json(path, "config.json")
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {path}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    try:
        cfg = config_from_hf(d)
    except ConfigError as e:
        if type(e) is not ConfigError or path in str(e):
            raise
        raise ConfigError(f"{path}: {e}") from None
    layout = family(cfg).checkpoint_layout
    return cfg if layout is None else layout(cfg, os.path.dirname(path))


def save_config(config: ModelConfig, directory: str | os.PathLike) -> None:
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config.to_hf(), f, indent=2, sort_keys=True)
