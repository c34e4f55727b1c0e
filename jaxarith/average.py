"""Weight averaging along a training run: immutable, jittable averagers over parameter trees.

An averager is a frozen dataclass registered as a pytree: its hyper-parameters are static
metadata, its running average is data. ``update(params, step)`` returns a new averager and is pure,
so it runs inside the jitted train step and is sharded like the parameters it follows::

    ema = EMA.init(params, decay=0.999)
    ema = ema.update(params, step)        # inside jit
    eval_loss(ema.value(), ...)

Implemented: :class:`EMA` (exponential moving average, built on ``optax.incremental_update``) and
:class:`SWA` (uniform average of the weights every ``every`` steps from ``start``).

Extension point: a new method (e.g. LaWA, the average of the last k checkpoints kept in a
ring buffer ``[k, ...]`` per leaf) is one more dataclass with the same three members: a ``init``
classmethod, a pure ``update(params, step) -> Self`` and ``value() -> params``; the trainer only
calls these, so it needs no change. :func:`make_averager` maps a config name to a class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax

from jaxarith.errors import ConfigError

Params = Any


class Averager(Protocol):
    """What the trainer needs from an averaging method."""

    def update(self, params: Params, step: jax.Array) -> Averager: ...

    def value(self) -> Params: ...


def _f32(tree: Params) -> Params:
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


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


AVERAGERS = {"ema": EMA, "swa": SWA}


def make_averager(kind: str, params: Params, **options) -> Averager | None:
    """An averager by config name (``none`` gives None), started at ``params``."""
    if kind in ("none", "", None):
        return None
    if kind not in AVERAGERS:
        raise ConfigError(f"average.kind={kind!r}: expected one of none, {', '.join(AVERAGERS)}")
    return AVERAGERS[kind].init(params, **options)
