"""The registered model families, looked up by :class:`~jaxarith.models.family.Arch`, by config
or by HF ``model_type``.

Adding a family: write its module (a config class and a ``FAMILY``, see ``llama.py``), add its
``Arch`` member in ``family.py`` and list the module in ``_MODULES`` below.
"""

from __future__ import annotations

from typing import Any

from jaxarith.errors import UnsupportedArchitectureError
from jaxarith.models import gpt2, llama
from jaxarith.models.family import Arch, Family

_MODULES = (llama, gpt2)

FAMILIES: dict[Arch, Family] = {m.FAMILY.arch: m.FAMILY for m in _MODULES}
_BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES.values() for t in f.model_types}


def family(arch_or_config: Arch | str | Any) -> Family:
    """The family of an :class:`Arch` (or its string) or of a config object."""
    arch = getattr(arch_or_config, "arch", arch_or_config)
    try:
        return FAMILIES[Arch(arch)]
    except ValueError:
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported; jaxarith implements "
            f"{sorted(str(a) for a in FAMILIES)}") from None


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
