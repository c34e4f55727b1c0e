"""Learning-rate schedules built from optax pieces, described by one frozen config.

Three shapes cover pre-training and continued pre-training (Ibrahim et al. 2024, "Simple and
Scalable Strategies to Continually Pre-train Large Language Models"):

* ``cosine``: linear warmup from ``init_lr`` to ``peak_lr``, cosine decay to ``end_lr`` at
  ``total_steps`` (the classic pre-training schedule).
* ``wsd``: warmup, a constant stage at ``peak_lr``, then a cooldown over the last
  ``cooldown_steps`` to ``end_lr`` (linear or ``1-sqrt``): the "infinite" / warmup-stable-decay
  schedule, which can be extended without knowing the final length in advance.
* ``rewarm``: the continued pre-training recipe: start at ``init_lr`` (typically the previous
  run's final LR), **re-warm** linearly to ``peak_lr``, optionally hold for ``hold_steps``, then
  **re-decay** with a cosine to ``end_lr``.
* ``swa``: the SWA paper's schedule (Izmailov et al. 2018): warmup, cosine decay from
  ``peak_lr`` to ``swa_lr`` reached at ``swa_start`` (by default the train config's
  ``average.start``), then constant ``swa_lr`` (``swa_cycle: 0``) or cycles of ``swa_cycle``
  steps, each falling linearly from near ``peak_lr`` to ``swa_lr`` at its last step, where SWA
  (``average.every = swa_cycle``) takes its snapshot.

Every schedule is an ``optax.Schedule`` (a pure function of the step, jittable), assembled with
``optax.join_schedules``. Warmup and cooldown lengths are given in steps or as fractions of the
run (``warmup_fraction: 0.05``), so one config works for a 60-step smoke test and the full run.

Example::

    sched = ScheduleConfig(kind="rewarm", init_lr=3e-5, peak_lr=3e-4, end_lr=3e-5,
                           warmup_steps=100, total_steps=1000).build()
    sched(0), sched(100), sched(1000)   # 3e-5, 3e-4, 3e-5
"""

from __future__ import annotations

import dataclasses
import enum

import jax.numpy as jnp
import optax

from jaxarith.errors import ConfigError


class ScheduleKind(enum.StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"
    WSD = "wsd"
    REWARM = "rewarm"
    SWA = "swa"


class Cooldown(enum.StrEnum):
    LINEAR = "linear"
    SQRT = "1-sqrt"  # lr = end + (peak - end) * (1 - sqrt(t / T)), Hägele et al. 2024


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """A learning-rate schedule.

    Attributes:
      kind: constant | cosine | wsd | rewarm.
      peak_lr: the LR after warmup.
      init_lr: the LR at step 0 (warmup start; for ``rewarm`` the previous run's final LR).
      end_lr: the LR at ``total_steps`` (cosine, rewarm) or after the cooldown (wsd).
      warmup_steps: linear warmup (re-warm) length.
      warmup_fraction: the warmup as a fraction of ``total_steps`` (rounded to a step); used
        when ``warmup_steps`` is 0.
      hold_steps: ``rewarm`` only: steps at ``peak_lr`` before the re-decay.
      cooldown_steps: ``wsd`` only: length of the final decay.
      cooldown_fraction: ``wsd`` only: the cooldown as a fraction of ``total_steps``; used when
        ``cooldown_steps`` is 0.
      cooldown: ``wsd`` only: linear | 1-sqrt.
      total_steps: schedule length; 0 means "the run's ``steps``" (filled in by the trainer).
      swa_lr: ``swa`` only: the learning rate of the SWA phase (the cycles' low end).
      swa_cycle: ``swa`` only: cycle length in steps (0: constant ``swa_lr``).
      swa_start: ``swa`` only: first step of the SWA phase; -1 means the train config's
        ``average.start`` (filled in by the trainer).
    """

    kind: ScheduleKind = ScheduleKind.COSINE
    peak_lr: float = 3e-4
    init_lr: float = 0.0
    end_lr: float = 0.0
    warmup_steps: int = 0
    hold_steps: int = 0
    cooldown_steps: int = 0
    cooldown: Cooldown = Cooldown.LINEAR
    total_steps: int = 0
    warmup_fraction: float = 0.0
    cooldown_fraction: float = 0.0
    swa_lr: float = 0.0
    swa_cycle: int = 0
    swa_start: int = -1

    def __post_init__(self):
        object.__setattr__(self, "kind", _enum(ScheduleKind, self.kind, "schedule.kind"))
        object.__setattr__(self, "cooldown", _enum(Cooldown, self.cooldown, "schedule.cooldown"))
        for name in ("peak_lr", "init_lr", "end_lr", "swa_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"schedule.{name}={getattr(self, name)} must be >= 0")
        for name in ("warmup_steps", "hold_steps", "cooldown_steps", "total_steps", "swa_cycle"):
            if getattr(self, name) < 0:
                raise ConfigError(f"schedule.{name}={getattr(self, name)} must be >= 0")
        for name in ("warmup_fraction", "cooldown_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"schedule.{name}={getattr(self, name)} must be in [0, 1]")
        if self.total_steps:
            self._check_fits(self.total_steps)

    def warmup(self, total: int | None = None) -> int:
        """Warmup steps: ``warmup_steps``, else ``warmup_fraction`` of the run."""
        total = self.total_steps if total is None else total
        return self.warmup_steps or round(self.warmup_fraction * total)

    def cooldown_length(self, total: int | None = None) -> int:
        """``wsd`` cooldown steps: ``cooldown_steps``, else ``cooldown_fraction`` of the run."""
        total = self.total_steps if total is None else total
        return self.cooldown_steps or round(self.cooldown_fraction * total)

    def _check_fits(self, total: int) -> None:
        used = self.warmup(total) + (self.hold_steps if self.kind is ScheduleKind.REWARM else 0) \
            + (self.cooldown_length(total) if self.kind is ScheduleKind.WSD else 0)
        if self.kind is not ScheduleKind.CONSTANT and used > total:
            raise ConfigError(f"schedule: warmup/hold/cooldown steps ({used}) exceed "
                              f"total_steps={total} (give them as warmup_fraction / "
                              "cooldown_fraction of the run to scale with steps)")
        if self.kind is ScheduleKind.SWA and self.swa_start >= 0 and not \
                self.warmup(total) <= self.swa_start <= total:
            raise ConfigError(f"schedule.swa_start={self.swa_start} must lie between the "
                              f"warmup ({self.warmup(total)} steps) and total_steps={total}")

    def with_swa_start(self, start: int | None) -> ScheduleConfig:
        """This schedule with ``swa_start`` filled in (from ``average.start``) when it was -1."""
        if self.kind is not ScheduleKind.SWA or self.swa_start >= 0 or start is None:
            return self
        return dataclasses.replace(self, swa_start=start)

    def with_total(self, total_steps: int) -> ScheduleConfig:
        """This schedule with ``total_steps`` filled in when it was 0."""
        if self.total_steps:
            return self
        return dataclasses.replace(self, total_steps=total_steps)

    def build(self) -> optax.Schedule:
        """The schedule as an ``optax.Schedule`` (requires ``total_steps``)."""
        total = self.total_steps
        if not total and self.kind is not ScheduleKind.CONSTANT:
            raise ConfigError("schedule.total_steps is 0: call with_total(steps) first")
        k, warm = self.kind, self.warmup()
        if k is ScheduleKind.CONSTANT:
            return warmup_then(self.init_lr, self.peak_lr, warm,
                               [optax.constant_schedule(self.peak_lr)], [])
        if k is ScheduleKind.COSINE:
            return warmup_cosine(self.init_lr, self.peak_lr, self.end_lr, warm, total)
        if k is ScheduleKind.WSD:
            return wsd(self.init_lr, self.peak_lr, self.end_lr, warm, self.cooldown_length(),
                       total, self.cooldown)
        if k is ScheduleKind.SWA:
            if self.swa_start < 0:
                raise ConfigError("schedule.kind=swa needs schedule.swa_start or "
                                  "average.kind=swa with average.start")
            return swa(self.init_lr, self.peak_lr, self.swa_lr, warm, self.swa_start,
                       self.swa_cycle)
        return rewarm_redecay(self.init_lr, self.peak_lr, self.end_lr, warm, self.hold_steps,
                              total)


def warmup_then(init_lr: float, peak_lr: float, warmup_steps: int,
                rest: list[optax.Schedule], boundaries: list[int]) -> optax.Schedule:
    """A linear warmup from ``init_lr`` to ``peak_lr`` followed by ``rest`` (joined)."""
    if warmup_steps == 0:
        return rest[0] if len(rest) == 1 else optax.join_schedules(rest, boundaries)
    warm = optax.linear_schedule(init_lr, peak_lr, warmup_steps)
    return optax.join_schedules([warm, *rest], [warmup_steps, *boundaries])


def warmup_cosine(init_lr: float, peak_lr: float, end_lr: float, warmup_steps: int,
                  total_steps: int) -> optax.Schedule:
    """Linear warmup then cosine decay reaching ``end_lr`` at ``total_steps`` (held after)."""
    decay = optax.cosine_decay_schedule(peak_lr, max(total_steps - warmup_steps, 1),
                                        alpha=_ratio(end_lr, peak_lr))
    return warmup_then(init_lr, peak_lr, warmup_steps, [decay], [])


def wsd(init_lr: float, peak_lr: float, end_lr: float, warmup_steps: int, cooldown_steps: int,
        total_steps: int, cooldown: Cooldown | str = Cooldown.LINEAR) -> optax.Schedule:
    """Warmup, constant ``peak_lr``, then a cooldown over the last ``cooldown_steps``."""
    cooldown = Cooldown(cooldown)
    stable = total_steps - warmup_steps - cooldown_steps
    if cooldown is Cooldown.LINEAR:
        cool = optax.linear_schedule(peak_lr, end_lr, max(cooldown_steps, 1))
    else:
        n = max(cooldown_steps, 1)

        def cool(count):
            frac = jnp.clip(count / n, 0.0, 1.0)
            return end_lr + (peak_lr - end_lr) * (1.0 - jnp.sqrt(frac))
    parts = [optax.constant_schedule(peak_lr), cool]
    return warmup_then(init_lr, peak_lr, warmup_steps, parts, [warmup_steps + stable])


def rewarm_redecay(init_lr: float, peak_lr: float, end_lr: float, warmup_steps: int,
                   hold_steps: int, total_steps: int) -> optax.Schedule:
    """Continued pre-training: re-warm ``init_lr -> peak_lr``, hold, cosine re-decay."""
    decay_steps = max(total_steps - warmup_steps - hold_steps, 1)
    decay = optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=_ratio(end_lr, peak_lr))
    if hold_steps:
        return warmup_then(init_lr, peak_lr, warmup_steps,
                           [optax.constant_schedule(peak_lr), decay],
                           [warmup_steps + hold_steps])
    return warmup_then(init_lr, peak_lr, warmup_steps, [decay], [])


def swa(init_lr: float, peak_lr: float, swa_lr: float, warmup_steps: int, swa_start: int,
        swa_cycle: int = 0) -> optax.Schedule:
    """SWA (Izmailov et al. 2018): warmup, cosine ``peak_lr -> swa_lr`` reached at
    ``swa_start``, then constant ``swa_lr`` or cycles of ``swa_cycle`` steps.

    In a cycle, update ``r = 1..c`` uses ``lr = (1 - r/c) peak_lr + (r/c) swa_lr`` (the paper's
    ``t(i) = (mod(i - 1, c) + 1) / c``), so the weights after update ``c`` of each cycle, i.e.
    at steps ``swa_start + j c``, were made with ``swa_lr``: SWA with ``start = swa_start`` and
    ``every = swa_cycle`` averages exactly those.
    """
    decay = optax.cosine_decay_schedule(peak_lr, max(swa_start - warmup_steps, 1),
                                        alpha=_ratio(swa_lr, peak_lr))
    if swa_cycle:
        c = swa_cycle

        def after(count):
            t = (jnp.mod(count, c) + 1) / c
            return (1.0 - t) * peak_lr + t * swa_lr
    else:
        after = optax.constant_schedule(swa_lr)
    if swa_start == warmup_steps:
        return warmup_then(init_lr, peak_lr, warmup_steps, [after], [])
    return warmup_then(init_lr, peak_lr, warmup_steps, [decay, after], [swa_start])


def _ratio(end: float, peak: float) -> float:
    return end / peak if peak else 0.0


def _enum(cls, value, key: str):
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r}: expected one of "
                          f"{', '.join(m.value for m in cls)}") from None
