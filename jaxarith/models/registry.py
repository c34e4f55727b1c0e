"""The registered model families, looked up by :class:`~jaxarith.models.family.Arch`, by config
or by HF ``model_type``.

Adding a family: write its module (a config class and a ``FAMILY``, see ``llama.py``), add its
``Arch`` member in ``family.py`` and list the module in ``_MODULES`` below. Experiments may also
:func:`register` a family at run time (its ``arch`` then is any string).
"""

from __future__ import annotations

from typing import Any

from jaxarith.errors import ConfigError, UnsupportedArchitectureError
from jaxarith.models import gemma2, gemma3, gpt2, llama, mixtral, qwen2, qwen3, qwen3_moe
from jaxarith.models.family import Arch, Family

_MODULES = (llama, gpt2, mixtral, qwen2, qwen3, qwen3_moe, gemma2, gemma3)

FAMILIES: dict[str, Family] = {}
_BY_MODEL_TYPE: dict[str, Family] = {}


def register(fam: Family) -> Family:
    """Make ``fam`` known by its ``arch`` and HF ``model_types``.

    Raises:
        ConfigError: the arch or a model type is already registered.
    """
    taken = [t for t in fam.model_types if t in _BY_MODEL_TYPE]
    if str(fam.arch) in FAMILIES or taken:
        raise ConfigError(f"family {str(fam.arch)!r} (model types {list(fam.model_types)}) is "
                          f"already registered")
    FAMILIES[str(fam.arch)] = fam
    _BY_MODEL_TYPE.update({t: fam for t in fam.model_types})
    return fam


for _module in _MODULES:
    register(_module.FAMILY)


def family(arch_or_config: Arch | str | Any) -> Family:
    """The family of an :class:`Arch` (or its string) or of a config object."""
    arch = getattr(arch_or_config, "arch", arch_or_config)
    if str(arch) not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"architecture {str(arch)!r} is not supported; jaxarith implements "
            f"{sorted(FAMILIES)}")
    return FAMILIES[str(arch)]


def model_types() -> list[str]:
    """Every HF ``model_type`` some family serves."""
    return sorted(_BY_MODEL_TYPE)


def family_for_model_type(model_type: Any) -> Family:
    """The family serving an HF ``model_type``.

    Raises:
        UnsupportedArchitectureError: ``model_type`` is missing or not implemented.
    """
    if model_type not in _BY_MODEL_TYPE:
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r} is not supported; jaxarith implements {model_types()}")
    return _BY_MODEL_TYPE[model_type]


def config_classes() -> dict[str, type]:
    """``{class name: config class}`` of every family."""
    return {f.config_class.__name__: f.config_class for f in FAMILIES.values()}
