"""Merge parameters checked before any work: their types, their ranges, and weights that cannot
be normalised.

mergekit accepts some settings that make no sense and then quietly does something else: a TIES
``density`` of -0.1 keeps nothing (the base comes back unchanged), 1.5 keeps everything, a
normalised linear merge whose weights sum to 0 divides by zero. jaxarith refuses them, naming the
model and the parameter (see docs/arith.md, "Stricter than mergekit"):

- every setting is a number, a list of numbers (a schedule over depth) or a list of
  ``{filter, value}`` entries, its numbers finite (no booleans, strings, NaN or Inf);
- ``density`` is in ``(0, 1]``;
- a normalised merge (``normalize``, the default of linear, ties and dare_ties) whose weights sum
  to 0 for some tensor is refused, naming the tensor; so is a linear merge whose weights are all
  0 (an all-zero model);
- ``normalize``, ``rescale`` and ``int8_mask`` are booleans, ``seed`` an integer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxarith.arith.methods import _TASK, Kind
from jaxarith.arith.select import MergeSpec
from jaxarith.configfile import short
from jaxarith.errors import ConfigError
from jaxarith.io.convert.keymap import expand, rules_for

# Ranges of parameters: name -> (low, low open, high, what mergekit does outside).
_RANGES = {"density": (0.0, True, 1.0, "mergekit keeps nothing at <= 0 and everything at >= 1")}


def setting_numbers(setting: Any, where: str) -> list[float]:
    """Every number of a parameter setting, type-checked (see the module doc).

    Raises:
      ConfigError: naming ``where`` and quoting (a short form of) the bad value.
    """
    expected = "expected a number, a list of numbers or a list of {filter, value} entries"
    if isinstance(setting, bool):
        raise ConfigError(f"{where}: {expected}, got {short(setting)}")
    if isinstance(setting, int | float):
        if not math.isfinite(setting):
            raise ConfigError(f"{where}: {setting} is not a finite number")
        return [float(setting)]
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, Sequence) and not isinstance(setting, str) and setting:
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in setting):
            return [x for v in setting for x in setting_numbers(v, where)]
        out = []
        for i, cond in enumerate(setting):
            if not isinstance(cond, Mapping) or "value" not in cond or \
                    set(cond) - {"filter", "value"}:
                raise ConfigError(f"{where}: {expected}, got {short(setting)}")
            if not isinstance(cond.get("filter") or "", str):
                raise ConfigError(f"{where}[{i}].filter: expected a tensor name pattern, got "
                                  f"{short(cond['filter'])}")
            out += setting_numbers(cond["value"], f"{where}[{i}].value")
        return out
    raise ConfigError(f"{where}: {expected}, got {short(setting)}")


def _check_range(name: str, numbers: list[float], where: str) -> None:
    if name not in _RANGES:
        return
    lo, lo_open, hi, mergekit = _RANGES[name]
    for x in numbers:
        if x < lo or (lo_open and x == lo) or x > hi:
            raise ConfigError(f"{where} {x} is outside {'(' if lo_open else '['}{lo:g}, "
                              f"{hi:g}] ({mergekit})")


def check_settings(spec: MergeSpec, labels: Sequence[str] | None = None) -> None:
    """Type- and range-check every parameter setting of ``spec`` (no model needed).

    Args:
      labels: how to name each weighted model (default: ``model i``).
    """
    kind = spec.method.kind
    for name, setting in spec.shared.items():
        where = f"{kind}: parameter {name}"
        _check_range(name, setting_numbers(setting, where), where)
    for i, params in enumerate(spec.per_model):
        label = labels[i] if labels is not None and i < len(labels) else f"model {i}"
        for name, setting in params.items():
            where = f"{kind}: {label}: {name}"
            _check_range(name, setting_numbers(setting, where), where)


def normalizes(method) -> bool:
    """Whether ``method`` divides by the sum of its weights."""
    if method.kind is Kind.LINEAR:
        return True if method.normalize is None else method.normalize
    if method.kind in _TASK:
        return _TASK[method.kind][2] if method.normalize is None else method.normalize
    return False


def check_weights(spec: MergeSpec, cfg, n_inputs: int,
                  labels: Sequence[str] | None = None) -> None:
    """Refuse weights a merge cannot use, tensor by tensor (schedules and filters resolved).

    A normalised merge whose weights sum to 0 for a tensor divides by 0 there; a linear merge
    whose weights are all 0 writes zeros. Raises a ConfigError naming the tensor (and layer).
    """
    if "weight" not in spec.method.per_model_params:
        return

    norm = normalizes(spec.method)
    L = cfg.num_hidden_layers
    for rule in rules_for(cfg):
        for key, layer in expand(rule, L):
            lay = layer[0] if isinstance(layer, tuple) else layer
            canon = "/".join(rule.targets[0])
            p, selected = spec.tensor_params((canon, key), lay, L, 1, n_inputs)
            if not selected:
                continue
            w = np.asarray(p["weight"], np.float64)
            names = f" ({', '.join(labels)})" if labels and len(labels) <= 8 else ""
            if spec.method.kind is Kind.LINEAR and not w.any():
                raise ConfigError(f"{spec.method.kind}: every weight is 0 for tensor {key}"
                                  f"{names}: the merge would be all zeros")
            if norm and abs(w.sum()) < 1e-8:
                raise ConfigError(f"{spec.method.kind}: the weights {w.tolist()}{names} sum to "
                                  f"0 for tensor {key}, and the merge is normalised (divides by "
                                  "that sum); give weights with a non-zero sum, or "
                                  "normalize: false")
