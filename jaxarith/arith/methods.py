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
    SLERP = "slerp"


# Generalised task arithmetic: (sparsification, consensus, default normalize), as in mergekit.
_TASK = {
    Kind.TASK_ARITHMETIC: (None, None, False),
    Kind.TIES: ("magnitude", "sum", True),
    Kind.DARE_LINEAR: ("random", None, False),
    Kind.DARE_TIES: ("random", "sum", True),
}
_TWO_INPUTS = (Kind.DELTA, Kind.ADD, Kind.LERP, Kind.APPLY_DELTA, Kind.SLERP)
# Numeric parameters: shared (one value per tensor) and per model (one per non-base model).
_SHARED = {Kind.SCALE: {"scale": 1.0}, Kind.APPLY_DELTA: {"scale": 1.0}, Kind.LERP: {"t": None},
           Kind.SLERP: {"t": None}, **{k: {"lambda": 1.0} for k in _TASK}}
_PER_MODEL = {Kind.LINEAR: {"weight": 1.0},
              **{k: {"weight": 1.0, "density": 1.0} for k in _TASK}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """One merge or arithmetic operation and its static options.

    Attributes:
      kind: the operation.
      normalize: divide by the (agreeing) weights' sum; None = the method's default
        (True for linear, ties, dare_ties; False for task_arithmetic, dare_linear).
      rescale: DARE's ``1 / density`` rescale of kept entries.
      consensus: TIES sign election, ``"sum"`` (the paper) or ``"count"``.
      dot_threshold: SLERP falls back to lerp above this ``|cos|``.
      merge_dtype: a merge config's ``dtype``, as mergekit uses it: every input is rounded to it
        before the float32 math, and the result too (before the cast to the output dtype);
        None = inputs as stored, result straight to the output dtype.
    """

    kind: Kind
    normalize: bool | None = None
    rescale: bool = True
    consensus: str = "sum"
    dot_threshold: float = 0.9995
    merge_dtype: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "kind", Kind(self.kind))
        if self.merge_dtype is not None:
            try:
                object.__setattr__(self, "merge_dtype", jnp.dtype(self.merge_dtype).name)
            except TypeError:
                raise ConfigError(f"dtype {self.merge_dtype!r}: not a dtype") from None
        if self.consensus not in ("sum", "count"):
            raise ConfigError(f"consensus {self.consensus!r}: expected 'sum' or 'count'")

    @property
    def has_base(self) -> bool:
        """The first input is a base model that the others are differenced against."""
        return self.kind in _TASK

    @property
    def uses_key(self) -> bool:
        return self.kind in (Kind.DARE_LINEAR, Kind.DARE_TIES)

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
        """SLERP accumulates its norms and angle in float64 (see ``ops.slerp``)."""
        return self.kind is Kind.SLERP

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
        normalize = self.normalize
        if k is Kind.LINEAR:
            return ops.linear(jnp.stack(xs), p["weight"], True if normalize is None else normalize)
        sparsification, consensus, default_norm = _TASK[k]
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(len(xs) - 1))
        return ops.task_merge(
            xs[0], jnp.stack(xs[1:]), p["weight"], p["lambda"], ks=p["k"], densities=p["density"],
            keys=keys, sparsification=sparsification,
            consensus=self.consensus if consensus else None,
            normalize=default_norm if normalize is None else normalize, rescale=self.rescale,
            layout=layout, thrs=p.get("thr"), cuts=p.get("cut"),
        )


def method(name: str, **options) -> Method:
    """A :class:`Method` from its name (``"ties"``, ``"dare_ties"``, ...) and options."""
    try:
        kind = Kind(name)
    except ValueError:
        raise ConfigError(f"unknown merge method {name!r}; known: "
                          f"{', '.join(k.value for k in Kind)}") from None
    return Method(kind=kind, **options)
