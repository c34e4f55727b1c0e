"""Which tensors an operation touches, and the value of each parameter for each tensor and layer.

Names. A tensor is known by its canonical path (``layers/attn/q``, ``embed``) and by its HF name
(``model.layers.3.self_attn.q_proj.weight``); a pattern matches if it matches either. A pattern
with glob characters (``* ? [``) must match the whole name (``layers/attn/*``,
``model.layers.*.mlp.*``); a plain word matches as a substring (``mlp``, ``self_attn``,
``embed``), like mergekit's ``filter``.

Parameter settings (the YAML forms of mergekit, usable from Python too):

- a number: the same value everywhere;
- a list of numbers: a schedule over depth. Layer ``i`` of ``L`` sits at ``t = i / (L - 1)`` and
  takes the piecewise-linear interpolation of the list at ``t * (len - 1)``; a list of ``L``
  values is therefore one value per layer. Tensors outside the layers (embeddings, final norm,
  head) sit at ``t = 0`` (mergekit's rule);
- a list of ``{filter: pattern, value: setting}`` (a missing filter matches everything): the first
  matching entry's value. A plain-word filter is a substring of the HF name only (as in mergekit:
  ``mlp`` matches ``model.layers.0.mlp.up_proj.weight``, not the norm ``layers/mlp_norm``); a
  glob or a pattern containing ``/`` may match the canonical path too.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxarith.arith import ops
from jaxarith.arith.methods import Method
from jaxarith.errors import ConfigError

Setting = Any  # float | list[float] | list[{"filter": str, "value": Setting}]


def matches(pattern: str, names: Sequence[str]) -> bool:
    """True if ``pattern`` matches any of ``names`` (glob if it has ``*?[``, else substring)."""
    if pattern in ("", "*"):
        return True
    if any(c in pattern for c in "*?["):
        return any(fnmatch.fnmatchcase(n, pattern) for n in names)
    return any(pattern in n for n in names)


def matches_filter(pattern: str, names: Sequence[str]) -> bool:
    """A parameter setting's ``filter``: a plain word is a substring of the HF name (mergekit's
    rule, so ``mlp`` does not catch ``layers/mlp_norm``, HF's ``post_attention_layernorm``);
    a glob or a pattern with ``/`` also matches the canonical path. ``names`` is (canonical path,
    HF name) or just the canonical path."""
    plain = not any(c in pattern for c in "*?[/")
    return matches(pattern, names[1:] if plain and len(names) > 1 else names)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Selection:
    """Include/exclude patterns: a tensor is selected if it matches some ``include`` pattern (or
    ``include`` is empty) and no ``exclude`` pattern. Unselected tensors keep the first input's
    value (a zero delta for ``delta``)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        for f in ("include", "exclude"):
            v = getattr(self, f)
            object.__setattr__(self, f, (v,) if isinstance(v, str) else tuple(v))

    def __call__(self, names: Sequence[str]) -> bool:
        if self.include and not any(matches(p, names) for p in self.include):
            return False
        return not any(matches(p, names) for p in self.exclude)


def depth(layer: int | None, num_layers: int) -> float:
    """Position in ``[0, 1]`` of a layer for schedules; non-layer tensors sit at 0."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def resolve(setting: Setting, names: Sequence[str], t: float, what: str = "parameter") -> float:
    """The value of a setting for a tensor called ``names`` at depth ``t``."""
    if isinstance(setting, bool):
        raise ConfigError(f"{what}: expected a number, got {setting!r}")
    if isinstance(setting, int | float):
        return float(setting)
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, Sequence) and not isinstance(setting, str) and setting:
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in setting):
            x = t * (len(setting) - 1)
            i0 = int(x)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = x - i0
            return float((1 - frac) * setting[i0] + frac * setting[i1])
        for cond in setting:
            if not isinstance(cond, Mapping) or "value" not in cond:
                raise ConfigError(f"{what}: expected a number, a list of numbers or a list of "
                                  f"{{filter, value}} entries, got {setting!r}")
            if matches_filter(cond.get("filter") or "", names):
                return resolve(cond["value"], names, t, what)
        raise ConfigError(f"{what}: no entry of {setting!r} matches tensor {names[0]} (add one "
                          "without a filter as the default)")
    raise ConfigError(f"{what}: expected a number, a list of numbers or a list of "
                      f"{{filter, value}} entries, got {setting!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MergeSpec:
    """A method with its parameter settings, selection and seed: everything but the inputs.

    Attributes:
      method: the operation.
      shared: settings of shared parameters (``t``, ``lambda``, ``scale``).
      per_model: one mapping per weighted input (``weight``, ``density``); empty = defaults.
      selection: which tensors to touch.
      seed: DARE's PRNG seed; each tensor, layer and model gets its own key folded from it.
    """

    method: Method
    shared: Mapping[str, Setting] = dataclasses.field(default_factory=dict)
    per_model: tuple[Mapping[str, Setting], ...] = ()
    selection: Selection = Selection()
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "per_model", tuple(self.per_model))
        known = self.method.shared_params
        for name in self.shared:
            if name not in known:
                raise ConfigError(f"{self.method.kind}: unknown parameter {name!r} (takes "
                                  f"{', '.join(known) or 'none'})")
        for name, default in known.items():
            if default is None and name not in self.shared:
                raise ConfigError(f"{self.method.kind}: parameter {name!r} is required")
        per = self.method.per_model_params
        for i, m in enumerate(self.per_model):
            for name in m:
                if name not in per:
                    raise ConfigError(f"{self.method.kind}: model {i}: unknown parameter "
                                      f"{name!r} (takes {', '.join(per) or 'none'})")

    def check_inputs(self, n: int) -> None:
        self.method.check_inputs(n)
        m = self.method.num_weighted(n)
        if self.per_model and len(self.per_model) != m:
            raise ConfigError(f"{self.method.kind}: {len(self.per_model)} per-model parameter "
                              f"sets for {m} weighted models")
        for name, default in self.method.per_model_params.items():
            sets = self.per_model or ({},) * m
            missing = [i for i, s in enumerate(sets) if default is None and name not in s]
            if missing:
                raise ConfigError(f"{self.method.kind}: parameter {name!r} is required for "
                                  f"every model (missing for model(s) {missing})")

    def tensor_params(self, names: Sequence[str], layer: int | None, num_layers: int,
                      numel: int, n_inputs: int) -> tuple[dict[str, np.ndarray], bool]:
        """(numeric parameters, selected) of one tensor (one layer of a stacked one).

        Args:
          names: the tensor's canonical path and HF name.
          layer: its layer index, None outside the layers.
          numel: its number of entries (for the magnitude trim's keep count).
        """
        t = depth(layer, num_layers)
        p = {k: np.float32(resolve(self.shared.get(k, d), names, t, k))
             for k, d in self.method.shared_params.items()}
        per = self.method.per_model_params
        if per:
            m = self.method.num_weighted(n_inputs)
            sets = self.per_model or ({},) * m
            values = {}
            for k, d in per.items():
                if d is None and any(k not in s for s in sets):
                    raise ConfigError(f"{self.method.kind}: parameter {k!r} is required for "
                                      "every model")
                values[k] = [resolve(s.get(k, d), names, t, f"model {i}: {k}")
                             for i, s in enumerate(sets)]
                p[k] = np.array(values[k], np.float32)
            if "density" in values:
                # Counts from the YAML's Python floats, as mergekit takes them: float32(0.7) is
                # below 0.7, so int(float32(0.7) * 30720) = 21503, not 21504.
                dens = values["density"]
                if "gamma" in values:
                    hi_lo = [ops.outlier_counts(d, g, numel)
                             for d, g in zip(dens, values["gamma"], strict=True)]
                    p["k"] = np.array([h for h, _ in hi_lo], np.int32)
                    p["k_lo"] = np.array([lo for _, lo in hi_lo], np.int32)
                else:
                    p["k"] = np.array([ops.keep_count(v, numel) for v in dens], np.int32)
                for i, (d, e) in enumerate(zip(dens, values.get("epsilon", ()), strict=False)):
                    if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
                        raise ConfigError(f"{self.method.kind}: model {i}: tensor {names[-1]}: "
                                          f"density {d} +- epsilon {e} must lie in (0, 1)")
        return p, self.selection(names)


def expert_seed(seed: int, path: str, expert: int) -> np.ndarray:
    """:func:`path_seed` of expert ``expert``'s tensor in an ``[L, E, ...]`` leaf (each expert
    draws its own random masks)."""
    return path_seed(seed, f"{path}/{expert}")


def path_seed(seed: int, path: str) -> np.ndarray:
    """Raw PRNG key data ``[2] uint32`` of one canonical tensor: the seed and a stable hash of
    the path (the layer and the model are folded in by the executors' shared wrapper)."""
    return np.array([seed & 0xFFFFFFFF, zlib.crc32(path.encode())], np.uint32)
