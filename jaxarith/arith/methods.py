"""Which formula of ``ops.py`` a method runs, on which inputs, with which parameters.

A :class:`Method` is a frozen, hashable description (it is a static argument of the jitted
executors). ``method(xs, p, key)`` maps the float32 tensors of one tensor (one layer of a stacked
one) to the result; ``p`` holds the numeric parameters resolved for that tensor and layer
(per-model ones as ``[M]`` arrays), so per-layer schedules never trigger recompilation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum

import jax
import jax.numpy as jnp

from jaxarith.arith import ops
from jaxarith.errors import ConfigError


class Kind(enum.StrEnum):
    DELTA = "delta"
    ADD = "add"
    SCALE = "scale"
    LERP = "lerp"
    APPLY_DELTA = "apply_delta"
    LINEAR = "linear"
    TASK_ARITHMETIC = "task_arithmetic"
    TIES = "ties"
    DARE_LINEAR = "dare_linear"
    DARE_TIES = "dare_ties"
    BREADCRUMBS = "breadcrumbs"
    BREADCRUMBS_TIES = "breadcrumbs_ties"
    DELLA = "della"
    DELLA_LINEAR = "della_linear"
    SLERP = "slerp"
    NEARSWAP = "nearswap"
    MODEL_STOCK = "model_stock"
    SCE = "sce"
    NUSLERP = "nuslerp"
    MULTISLERP = "multislerp"
    ARCEE_FUSION = "arcee_fusion"
    KARCHER = "karcher"


# Generalised task arithmetic: (sparsification, consensus, default normalize, default rescale),
# as in mergekit 0.1.5's registry.
_TASK = {
    Kind.TASK_ARITHMETIC: (None, None, False, False),
    Kind.TIES: ("magnitude", "sum", True, False),
    Kind.DARE_LINEAR: ("random", None, False, True),
    Kind.DARE_TIES: ("random", "sum", False, True),
    Kind.BREADCRUMBS: ("magnitude_outliers", None, False, False),
    Kind.BREADCRUMBS_TIES: ("magnitude_outliers", "sum", False, False),
    Kind.DELLA: ("della_magprune", "sum", True, True),
    Kind.DELLA_LINEAR: ("della_magprune", None, False, True),
}
_TWO_INPUTS = (Kind.DELTA, Kind.ADD, Kind.LERP, Kind.APPLY_DELTA, Kind.SLERP, Kind.NEARSWAP,
               Kind.ARCEE_FUSION)
# The first input is a base model: always, or when the config names one (Method.base).
_BASE_REQUIRED = (*_TASK, Kind.NEARSWAP, Kind.MODEL_STOCK, Kind.SCE, Kind.ARCEE_FUSION)
_BASE_OPTIONAL = (Kind.NUSLERP, Kind.MULTISLERP)
# Numeric parameters: shared (one value per tensor) and per model (one per non-base model);
# None = required. They may be schedules over depth and filters.
_TASK_PER_MODEL = {"weight": 1.0, "density": 1.0}
_SHARED = {Kind.SCALE: {"scale": 1.0}, Kind.APPLY_DELTA: {"scale": 1.0}, Kind.LERP: {"t": None},
           Kind.SLERP: {"t": None}, Kind.NEARSWAP: {"t": None}, Kind.SCE: {"select_topk": 1.0},
           **{k: {"lambda": 1.0} for k in _TASK}}
_PER_MODEL = {Kind.LINEAR: {"weight": 1.0},
              **{k: dict(_TASK_PER_MODEL) for k in _TASK},
              Kind.BREADCRUMBS: {**_TASK_PER_MODEL, "gamma": 0.01},
              Kind.BREADCRUMBS_TIES: {**_TASK_PER_MODEL, "gamma": 0.01},
              Kind.DELLA: {**_TASK_PER_MODEL, "epsilon": 0.15},
              Kind.DELLA_LINEAR: {**_TASK_PER_MODEL, "epsilon": 0.15},
              Kind.NUSLERP: {"weight": None}, Kind.MULTISLERP: {"weight": None}}
# Static options (one value per merge: fields of Method), by the names a merge YAML uses.
_OPTIONS = {Kind.LINEAR: ("normalize",), Kind.TASK_ARITHMETIC: ("normalize",),
            Kind.TIES: ("normalize", "rescale", "consensus"),
            Kind.DARE_LINEAR: ("normalize", "rescale"),
            Kind.DARE_TIES: ("normalize", "rescale", "consensus"),
            Kind.BREADCRUMBS: ("normalize", "rescale"),
            Kind.BREADCRUMBS_TIES: ("normalize", "rescale", "consensus"),
            Kind.DELLA: ("normalize", "rescale", "consensus"),
            Kind.DELLA_LINEAR: ("normalize", "rescale"),
            Kind.MODEL_STOCK: ("filter_wise",),
            Kind.NUSLERP: ("nuslerp_row_wise", "nuslerp_flatten"),
            Kind.MULTISLERP: ("normalize_weights", "eps"), Kind.KARCHER: ("max_iter", "tol")}
# How many non-base models a merge takes: (min, max); None = no limit.
_COUNTS = {Kind.MODEL_STOCK: (2, None), Kind.NUSLERP: (2, 2), Kind.ARCEE_FUSION: (1, 1),
           Kind.NEARSWAP: (1, 1)}
SUMMARY = {
    Kind.DELTA: "tuned - base (a float32 task vector)",
    Kind.ADD: "a + b",
    Kind.SCALE: "scale * x",
    Kind.LERP: "(1 - t) a + t b",
    Kind.APPLY_DELTA: "model + scale * delta",
    Kind.LINEAR: "weighted average (model soup)",
    Kind.TASK_ARITHMETIC: "base + lambda * sum_i w_i (model_i - base)",
    Kind.TIES: "task vectors trimmed to their top-density magnitudes, sign election, "
               "disjoint mean",
    Kind.DARE_LINEAR: "task vectors randomly dropped (1 - density), rescaled, summed",
    Kind.DARE_TIES: "DARE drop and rescale, then TIES sign election",
    Kind.BREADCRUMBS: "task vectors without their smallest and gamma largest magnitudes, summed",
    Kind.BREADCRUMBS_TIES: "Model Breadcrumbs' trim, then TIES sign election",
    Kind.DELLA: "task vectors dropped with magnitude-ranked probabilities (density +- epsilon), "
                "TIES sign election",
    Kind.DELLA_LINEAR: "DELLA's drop, then a weighted sum",
    Kind.SLERP: "spherical interpolation of two models (t = 0: base)",
    Kind.NEARSWAP: "base moved to the model where they are closer than t",
    Kind.MODEL_STOCK: "base and the models' mean interpolated by their offsets' mean cosine",
    Kind.SCE: "top-variance entries selected, models weighted by mean square, sign election",
    Kind.NUSLERP: "spherical interpolation of two models (or task vectors) at w_1 / (w_0 + w_1)",
    Kind.MULTISLERP: "barycentric interpolation of the models (or task vectors) on the sphere",
    Kind.ARCEE_FUSION: "the model's changes kept where their KL-weighted importance is an outlier",
    Kind.KARCHER: "Riemannian (Karcher) mean of the models on the sphere, times their mean norm",
}
# Methods a merge YAML (`jaxarith merge`) can name; the others are arithmetic on two trees.
MERGE_METHODS = (Kind.LINEAR, Kind.TASK_ARITHMETIC, Kind.TIES, Kind.DARE_LINEAR, Kind.DARE_TIES,
                 Kind.BREADCRUMBS, Kind.BREADCRUMBS_TIES, Kind.DELLA, Kind.DELLA_LINEAR,
                 Kind.SLERP, Kind.NEARSWAP, Kind.MODEL_STOCK, Kind.SCE, Kind.NUSLERP,
                 Kind.MULTISLERP, Kind.ARCEE_FUSION, Kind.KARCHER)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """One merge or arithmetic operation and its static options.

    Attributes:
      kind: the operation.
      normalize: divide by the (agreeing) weights' sum; None = the method's default, mergekit
        0.1.5's (True for linear, ties, della; False for the others, dare_ties included).
      rescale: rescale kept task-vector entries; None = the method's default (True for DARE and
        DELLA). DARE divides by ``density``; TIES, Model Breadcrumbs and DELLA restore the task
        vector's L1 norm (mergekit's rule for them).
      consensus: TIES sign election, ``"sum"`` (the paper) or ``"count"``.
      dot_threshold: SLERP falls back to lerp above this ``|cos|``.
      merge_dtype: a merge config's ``dtype``, as mergekit uses it: every input is rounded to it
        before the float32 math, and the result too (before the cast to the output dtype);
        None = inputs as stored, result straight to the output dtype.
      base: nuslerp / multislerp: the first input is a base model (its task vectors are merged).
      filter_wise: model_stock: one angle per HF row instead of per tensor.
      nuslerp_row_wise, nuslerp_flatten: nuslerp: one angle per HF column, or per tensor
        (the default), else per HF row.
      normalize_weights, eps: multislerp: weights divided by their sum; the norm guard.
      max_iter, tol: karcher: iterations at most; the step (and norm, angle) below which it
        stops (ignores).
    """

    kind: Kind
    normalize: bool | None = None
    rescale: bool | None = None
    consensus: str = "sum"
    dot_threshold: float = 0.9995
    merge_dtype: str | None = None
    base: bool = False
    filter_wise: bool = False
    nuslerp_row_wise: bool = False
    nuslerp_flatten: bool = True
    normalize_weights: bool = True
    eps: float = 1e-8
    max_iter: int = 10
    tol: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "kind", Kind(self.kind))
        if self.merge_dtype is not None:
            try:
                object.__setattr__(self, "merge_dtype", jnp.dtype(self.merge_dtype).name)
            except TypeError:
                raise ConfigError(f"dtype {self.merge_dtype!r}: not a dtype") from None
        if self.consensus not in ("sum", "count"):
            raise ConfigError(f"consensus {self.consensus!r}: expected 'sum' or 'count'")
        for name in ("normalize", "rescale"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ConfigError(f"{self.kind}: {name} {v!r}: expected true or false")
        for name in ("base", "filter_wise", "nuslerp_row_wise", "nuslerp_flatten",
                     "normalize_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{self.kind}: {name} {getattr(self, name)!r}: expected true "
                                  "or false")
        for name in ("eps", "tol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ConfigError(f"{self.kind}: {name} {v!r}: expected a number >= 0")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or \
                not 0 <= self.max_iter <= 1000:
            raise ConfigError(f"{self.kind}: max_iter {self.max_iter!r}: expected an integer in "
                              "[0, 1000]")

    @property
    def has_base(self) -> bool:
        """The first input is a base model that the others are differenced against."""
        return self.kind in _BASE_REQUIRED or (self.kind in _BASE_OPTIONAL and self.base)

    @property
    def uses_key(self) -> bool:
        return self.kind in _TASK and _TASK[self.kind][0] in ("random", "della_magprune")

    @property
    def magnitude_trim(self) -> bool:
        """TIES: each task vector is trimmed to its largest magnitudes (``ops.magnitude_mask``)."""
        return self.kind in _TASK and _TASK[self.kind][0] == "magnitude"

    @property
    def keeps_float32(self) -> bool:
        """A delta is kept in float32 by default (bf16 would lose most of it)."""
        return self.kind is Kind.DELTA

    @property
    def wants_x64(self) -> bool:
        """Methods with sums over a tensor or row (SLERP's angle, norms, L1 rescales, weights)
        accumulate them in float64 (see ``ops.slerp`` and the mergekit section of ``ops``)."""
        return self.kind in (Kind.SLERP, Kind.MODEL_STOCK, Kind.SCE, Kind.NUSLERP,
                             Kind.MULTISLERP, Kind.ARCEE_FUSION, Kind.KARCHER) or (
            self.kind in _TASK and _TASK[self.kind][0] in ("magnitude_outliers",
                                                            "della_magprune")) or (
            self.magnitude_trim and bool(self.rescale))

    def precision(self):
        """Context the executors trace and run this method in (x64 on for ``wants_x64``)."""
        return jax.enable_x64(True) if self.wants_x64 else contextlib.nullcontext()

    @property
    def shared_params(self) -> dict[str, float | None]:
        return dict(_SHARED.get(self.kind, {}))

    @property
    def per_model_params(self) -> dict[str, float | None]:
        return dict(_PER_MODEL.get(self.kind, {}))

    def check_inputs(self, n: int) -> None:
        """Raise a ConfigError unless ``n`` inputs suit the method."""
        want = (2 if self.kind in _TWO_INPUTS else 1 if self.kind is Kind.SCALE else None)
        if want is not None and n != want:
            raise ConfigError(f"{self.kind}: takes {want} model(s), got {n}")
        if self.has_base and n < 2:
            raise ConfigError(f"{self.kind}: needs a base model and at least one other model")
        if n < 1:
            raise ConfigError(f"{self.kind}: no models given")
        lo, hi = _COUNTS.get(self.kind, (1, None))
        m = self.num_weighted(n)
        if m < lo or (hi is not None and m > hi):
            what = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else \
                f"{lo} to {hi}"
            raise ConfigError(f"{self.kind}: takes {what} model(s) besides the base, got {m}")

    def num_weighted(self, n_inputs: int) -> int:
        """How many inputs get per-model parameters (all but the base)."""
        return n_inputs - 1 if self.has_base else n_inputs

    def passthrough(self, xs: tuple[jax.Array, ...]) -> jax.Array:
        """The value of a tensor left out by the selection: the first input (a zero delta)."""
        return jnp.zeros_like(xs[0]) if self.kind is Kind.DELTA else xs[0]

    def __call__(self, xs: tuple[jax.Array, ...], p: dict[str, jax.Array],
                 key: jax.Array, layout: ops.Layout = None) -> jax.Array:
        """The result for one tensor: ``xs`` float32 inputs, ``p`` resolved parameters,
        ``layout`` where the tensor sits in its HF tensor (see :data:`ops.Layout`)."""
        k = self.kind
        if k is Kind.DELTA:
            return ops.delta(*xs)
        if k is Kind.ADD:
            return ops.add(*xs)
        if k is Kind.SCALE:
            return ops.scale(xs[0], p["scale"])
        if k is Kind.LERP:
            return ops.lerp(*xs, p["t"])
        if k is Kind.APPLY_DELTA:
            return ops.apply_delta(*xs, p["scale"])
        if k is Kind.SLERP:
            return ops.slerp(*xs, p["t"], dot_threshold=self.dot_threshold)
        if k is Kind.NEARSWAP:
            return ops.nearswap(*xs, p["t"])
        if k is Kind.MODEL_STOCK:
            return ops.model_stock(xs[0], jnp.stack(xs[1:]), self.filter_wise, layout)
        if k is Kind.SCE:
            return ops.sce(xs[0], jnp.stack(xs[1:]), p["select_topk"], layout)
        if k is Kind.NUSLERP:
            return ops.nuslerp(jnp.stack(xs), p["weight"], has_base=self.has_base,
                               flatten=self.nuslerp_flatten, row_wise=self.nuslerp_row_wise,
                               layout=layout)
        if k is Kind.MULTISLERP:
            return ops.multislerp(jnp.stack(xs), p["weight"], has_base=self.has_base,
                                  normalize_weights=self.normalize_weights, eps=self.eps)
        if k is Kind.ARCEE_FUSION:
            return ops.arcee_fusion(*xs, layout)
        if k is Kind.KARCHER:
            return ops.karcher(jnp.stack(xs), self.max_iter, self.tol)
        normalize = self.normalize
        if k is Kind.LINEAR:
            return ops.linear(jnp.stack(xs), p["weight"], True if normalize is None else normalize)
        sparsification, consensus, default_norm, default_rescale = _TASK[k]
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(len(xs) - 1))
        return ops.task_merge(
            xs[0], jnp.stack(xs[1:]), p["weight"], p["lambda"], ks=p["k"], densities=p["density"],
            keys=keys, sparsification=sparsification,
            consensus=self.consensus if consensus else None,
            normalize=default_norm if normalize is None else normalize,
            rescale=default_rescale if self.rescale is None else self.rescale,
            layout=layout, thrs=p.get("thr"), cuts=p.get("cut"), k_los=p.get("k_lo"),
            epsilons=p.get("epsilon"),
        )


def describe(kind: Kind | str) -> dict:
    """What a method takes, for ``jaxarith merge --list-methods``: its inputs, numeric
    parameters (shared / per model, with defaults; None = required) and static options."""
    kind = Kind(kind)
    m = Method(kind=kind)
    defaults = {f.name: f.default for f in dataclasses.fields(Method)}
    options = {}
    for name in _OPTIONS.get(kind, ()):
        v = defaults[name]
        if name == "normalize" and v is None:
            v = True if kind is Kind.LINEAR else _TASK[kind][2]
        elif name == "rescale" and v is None:
            v = _TASK[kind][3]
        options[name] = v
    base = ("required" if kind in _BASE_REQUIRED or kind is Kind.SLERP else
            "optional" if kind in _BASE_OPTIONAL else "none")
    lo, hi = _COUNTS.get(kind, (1, 1) if kind is Kind.SLERP else (1, None))
    return {"name": str(kind), "summary": SUMMARY[kind], "base_model": base,
            "models": {"min": lo, "max": hi}, "parameters": m.shared_params,
            "model_parameters": m.per_model_params, "options": options}


def optional_base(kind: Kind | str) -> bool:
    """Whether ``kind`` merges task vectors over a base when the config names one, and the
    models themselves otherwise (nuslerp, multislerp: ``Method.base``)."""
    return Kind(kind) in _BASE_OPTIONAL


def option_names(kind: Kind | str) -> tuple[str, ...]:
    """The static options a merge YAML may give ``kind`` in ``parameters``."""
    return _OPTIONS.get(Kind(kind), ())


def method(name: str, **options) -> Method:
    """A :class:`Method` from its name (``"ties"``, ``"dare_ties"``, ...) and options."""
    try:
        kind = Kind(name)
    except ValueError:
        raise ConfigError(f"unknown merge method {name!r}; known: "
                          f"{', '.join(k.value for k in Kind)}") from None
    return Method(kind=kind, **options)
