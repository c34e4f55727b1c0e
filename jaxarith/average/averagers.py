"""Weight averaging along a training run: immutable, jittable averagers over parameter trees.

An averager is a frozen dataclass registered as a pytree: its hyper-parameters are static
metadata, its running average is data. ``update(params, step)`` returns a new averager and is pure,
so it runs inside the jitted train step and is sharded like the parameters it follows::

    ema = EMA.init(params, decay=0.999)
    ema = ema.update(params, step)        # inside jit
    eval_loss(ema.value(), ...)

Implemented: :class:`EMA` (exponential moving average, built on ``optax.incremental_update``),
:class:`SWA` (uniform average of the weights every ``every`` steps from ``start``) and
:class:`LaWA` (latest-weight averaging, Kaddour 2022 / Sanyal et al. 2023: the uniform mean of
the ``k`` latest snapshots taken every ``every`` steps, kept in a ring buffer ``[k, ...]`` per
leaf).

Extension point: a new method is one more dataclass with the same members: an ``init``
classmethod, a pure ``update(params, step) -> Self``, ``value() -> params`` and
``shardings(param_shardings, replicated)`` (how its leaves are laid out on the mesh); the trainer
only calls these. Each method has one frozen config class (:class:`EMAConfig`,
:class:`SWAConfig`, :class:`LaWAConfig`, :class:`NoAverage`) selected by its ``kind``, the
``average:`` section of a train config; :func:`make_averager` maps a name to a class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxarith.errors import ConfigError

Params = Any


class Averager(Protocol):
    """What the trainer needs from an averaging method."""

    def update(self, params: Params, step: jax.Array) -> Averager: ...

    def value(self) -> Params: ...

    def shardings(self, param_shardings: Params, replicated) -> Any: ...


def _f32(tree: Params) -> Params:
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _like_params(avg, param_shardings: Params, replicated):
    """An averager's shardings: its ``params`` like the parameters, every other leaf replicated."""
    return dataclasses.replace(jax.tree.map(lambda _: replicated, avg), params=param_shardings)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EMA:
    """Exponential moving average of the parameters (float32).

    ``avg <- avg + (1 - d) * (params - avg)`` with ``d = min(decay, (1 + step) / (10 + step))``
    when ``warmup`` (the usual bias correction early in a run), else ``d = decay``.

    Attributes:
      params: the averaged tree.
      decay: the decay ``d`` in (0, 1) (static).
      warmup: ramp the decay up at the start (static).
    """

    params: Params
    decay: float = dataclasses.field(default=0.999, metadata=dict(static=True))
    warmup: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def init(cls, params: Params, *, decay: float = 0.999, warmup: bool = False) -> EMA:
        """Start the average at ``params`` (copied, float32)."""
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"average.decay={decay} must be in (0, 1)")
        return cls(params=_f32(params), decay=decay, warmup=warmup)

    def update(self, params: Params, step: jax.Array) -> EMA:
        """The average after seeing ``params`` at ``step`` (pure, jittable)."""
        d = jnp.asarray(self.decay, jnp.float32)
        if self.warmup:
            s = jnp.asarray(step, jnp.float32)
            d = jnp.minimum(d, (1.0 + s) / (10.0 + s))
        new = optax.incremental_update(_f32(params), self.params, step_size=1.0 - d)
        return dataclasses.replace(self, params=new)

    def value(self) -> Params:
        return self.params

    def shardings(self, param_shardings: Params, replicated) -> Any:
        """Shardings of this averager's leaves: the average like the parameters."""
        return _like_params(self, param_shardings, replicated)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SWA:
    """Stochastic weight averaging: the uniform mean of the weights seen every ``every`` steps
    from ``start`` on (float32); before ``start`` it tracks the current weights.

    Attributes:
      params: the running mean.
      count: how many snapshots the mean holds (int32 scalar).
      start, every: static schedule of snapshots.
    """

    params: Params
    count: jax.Array
    start: int = dataclasses.field(default=0, metadata=dict(static=True))
    every: int = dataclasses.field(default=1, metadata=dict(static=True))

    @classmethod
    def init(cls, params: Params, *, start: int = 0, every: int = 1) -> SWA:
        if every < 1 or start < 0:
            raise ConfigError(f"average: swa start={start} must be >= 0 and every={every} >= 1")
        return cls(params=_f32(params), count=jnp.zeros((), jnp.int32), start=start, every=every)

    def update(self, params: Params, step: jax.Array) -> SWA:
        step = jnp.asarray(step, jnp.int32)
        take = (step >= self.start) & ((step - self.start) % self.every == 0)
        n = jnp.where(take, self.count + 1, self.count)
        # count 0 -> step size 1 (the mean is the current weights)
        size = jnp.where(take, 1.0 / jnp.maximum(n, 1).astype(jnp.float32), 0.0)
        size = jnp.where(self.count == 0, 1.0, size)
        new = optax.incremental_update(_f32(params), self.params, step_size=size)
        return dataclasses.replace(self, params=new, count=n)

    def value(self) -> Params:
        return self.params

    def shardings(self, param_shardings: Params, replicated) -> Any:
        """Shardings of this averager's leaves: the average like the parameters."""
        return _like_params(self, param_shardings, replicated)


def snapshot_due(step, start: int, every: int):
    """Whether LaWA snapshots the weights after ``step`` (works on ints and traced arrays):
    ``step >= max(start, 1)`` and ``(step - start) % every == 0``."""
    if isinstance(step, int):
        return step >= max(start, 1) and (step - start) % every == 0
    step = jnp.asarray(step, jnp.int32)
    return (step >= max(start, 1)) & ((step - start) % every == 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LaWA:
    """Latest-weight averaging: the uniform mean of the ``k`` latest snapshots of the weights,
    taken at step ``start`` and every ``every`` steps after it (Kaddour 2022, "Stop wasting my
    time!"; Sanyal et al. 2023, "Early weight averaging meets high learning rates").

    Snapshots are taken after the steps ``s >= max(start, 1)`` with ``(s - start) % every == 0``
    (never of the initial weights, as :class:`SWA`). They live in a ring buffer: each parameter
    ``[*shape]`` has a float32 leaf ``[k, *shape]`` sharded like the parameter on its trailing
    axes (the ``k`` axis is not sharded), and snapshot number ``j`` (0-based) goes to slot
    ``j % k``. Before ``k`` snapshots exist :meth:`value` is the mean of those taken so far;
    before the first one it is the weights last seen (kept in slot 0).

    An update writes one slot in place (``dynamic_update_index_in_dim`` of either the new
    weights or the slot's old content), so a step costs one read and one write of the
    parameters, not ``k``.

    Attributes:
      buffer: ring buffer, leaves ``[k, *shape]`` float32.
      count: snapshots taken so far (int32 scalar); ``min(count, k)`` slots are filled.
      k, every, start: the static schedule.
    """

    buffer: Params
    count: jax.Array
    k: int = dataclasses.field(default=5, metadata=dict(static=True))
    every: int = dataclasses.field(default=1, metadata=dict(static=True))
    start: int = dataclasses.field(default=0, metadata=dict(static=True))

    @classmethod
    def init(cls, params: Params, *, k: int = 5, every: int = 1, start: int = 0) -> LaWA:
        """An empty ring buffer; ``params`` is shown by :meth:`value` until the first snapshot."""
        if k < 1 or every < 1 or start < 0:
            raise ConfigError(f"average: lawa k={k} and every={every} must be >= 1 and "
                              f"start={start} >= 0")

        def ring(x):
            x = jnp.asarray(x, jnp.float32)
            return jnp.zeros((k, *x.shape), jnp.float32).at[0].set(x)

        return cls(buffer=jax.tree.map(ring, params), count=jnp.zeros((), jnp.int32),
                   k=k, every=every, start=start)

    def taking(self, step: jax.Array) -> jax.Array:
        """True at the steps where a snapshot is taken."""
        return snapshot_due(step, self.start, self.every)

    def update(self, params: Params, step: jax.Array) -> LaWA:
        """Snapshot ``params`` into the next slot when ``step`` is a snapshot step (jittable).

        Before the first snapshot slot 0 follows the current weights, so :meth:`value` shows
        them.
        """
        take = self.taking(step)
        slot = self.count % self.k

        def write(buf, x):
            old = jax.lax.dynamic_index_in_dim(buf, slot, 0, keepdims=False)
            new = jnp.where(take | (self.count == 0), jnp.asarray(x, jnp.float32), old)
            return jax.lax.dynamic_update_index_in_dim(buf, new, slot, 0)

        buffer = jax.tree.map(write, self.buffer, params)
        return dataclasses.replace(self, buffer=buffer,
                                   count=self.count + take.astype(jnp.int32))

    def filled(self) -> jax.Array:
        """How many slots hold snapshots (at least 1: the placeholder before the first)."""
        return jnp.clip(self.count, 1, self.k)

    def value(self) -> Params:
        """The mean of the filled slots (float32)."""
        n = self.filled()
        mask = (jnp.arange(self.k) < n).astype(jnp.float32)

        def mean(buf):
            # [k] x [k, ...] -> [...]: tensordot keeps the trailing axes' sharding.
            return jnp.tensordot(mask, buf, axes=1) / n.astype(jnp.float32)

        return jax.tree.map(mean, self.buffer)

    def shardings(self, param_shardings: Params, replicated) -> Any:
        """The ring buffer like the parameters on its trailing axes, ``k`` unsharded."""
        def ring(s):
            return NamedSharding(s.mesh, PartitionSpec(None, *s.spec))

        return dataclasses.replace(jax.tree.map(lambda _: replicated, self),
                                   buffer=jax.tree.map(ring, param_shardings))


AVERAGERS = {"ema": EMA, "swa": SWA, "lawa": LaWA}


def make_averager(kind: str, params: Params, **options) -> Averager | None:
    """An averager by config name (``none`` gives None), started at ``params``."""
    if kind in ("none", "", None):
        return None
    if kind not in AVERAGERS:
        raise ConfigError(f"average.kind={kind!r}: expected one of none, {', '.join(AVERAGERS)}")
    return AVERAGERS[kind].init(params, **options)


# ----------------------------------------------------------------------------- configs


def _check_kind(cfg, kind: str) -> None:
    if cfg.kind != kind:
        raise ConfigError(f"average.kind={cfg.kind!r}: this section describes {kind!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoAverage:
    """``average: {kind: none}``: no averaging (the default)."""

    kind: str = "none"

    def __post_init__(self):
        _check_kind(self, "none")

    def options(self) -> dict:
        return {}

    def in_step(self) -> tuple[str, dict]:
        """(kind, options) of the averager held in the jitted step's state."""
        return self.kind, self.options()


@dataclasses.dataclass(frozen=True, kw_only=True)
class EMAConfig:
    """``average: {kind: ema, decay: 0.999, warmup: false}`` (see :class:`EMA`)."""

    kind: str = "ema"
    decay: float = 0.999
    warmup: bool = False

    def __post_init__(self):
        _check_kind(self, "ema")
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"average.decay={self.decay} must be in (0, 1)")

    def options(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup}

    def in_step(self) -> tuple[str, dict]:
        return self.kind, self.options()


@dataclasses.dataclass(frozen=True, kw_only=True)
class SWAConfig:
    """``average: {kind: swa, start: 0, every: 1}`` (see :class:`SWA`); pair it with
    ``schedule.kind: swa`` for the SWA paper's learning rate from ``start`` on."""

    kind: str = "swa"
    start: int = 0
    every: int = 1

    def __post_init__(self):
        _check_kind(self, "swa")
        if self.every < 1 or self.start < 0:
            raise ConfigError(f"average: swa start={self.start} must be >= 0 and "
                              f"every={self.every} >= 1")

    def options(self) -> dict:
        return {"start": self.start, "every": self.every}

    def in_step(self) -> tuple[str, dict]:
        return self.kind, self.options()


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaWAConfig:
    """``average: {kind: lawa, k: 5, every: 200, start: 0, offload: false}`` (see :class:`LaWA`).

    Attributes:
      k: how many latest snapshots the mean holds.
      every: steps between snapshots.
      start: snapshots are taken after steps ``s >= max(start, 1)`` with
        ``(s - start) % every == 0``.
      offload: keep the snapshots on the host (and on disk beside the checkpoints, under
        ``OUT/lawa/``) instead of in the jitted step's state, for models where ``k`` device
        copies do not fit; ``train/plugins/lawa.py`` takes them and reports ``eval_avg``.
    """

    kind: str = "lawa"
    k: int = 5
    every: int = 1
    start: int = 0
    offload: bool = False

    def __post_init__(self):
        _check_kind(self, "lawa")
        if self.k < 1 or self.every < 1 or self.start < 0:
            raise ConfigError(f"average: lawa k={self.k} and every={self.every} must be >= 1 "
                              f"and start={self.start} >= 0")

    def options(self) -> dict:
        return {"k": self.k, "every": self.every, "start": self.start}

    def in_step(self) -> tuple[str, dict]:
        """Offloaded snapshots live on the host (``train/plugins/lawa.py``), not in the step."""
        return ("none", {}) if self.offload else (self.kind, self.options())


AverageConfig = NoAverage | EMAConfig | SWAConfig | LaWAConfig
CONFIGS = {c.kind: c for c in (NoAverage, EMAConfig, SWAConfig, LaWAConfig)}
