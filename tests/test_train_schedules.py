"""Learning-rate schedules: the values at the knots the config names, and the shapes between."""

import math

import numpy as np
import pytest

from jaxarith.errors import ConfigError
from jaxarith.schedules import ScheduleConfig


def _values(cfg, steps):
    sched = cfg.build()
    return np.array([float(sched(s)) for s in steps])


@pytest.mark.parametrize("cfg", [
    ScheduleConfig(kind="rewarm", init_lr=3e-5, peak_lr=3e-4, end_lr=3e-5, warmup_steps=100,
                   total_steps=1000),
    ScheduleConfig(kind="rewarm", init_lr=1e-5, peak_lr=2e-4, end_lr=0.0, warmup_steps=50,
                   hold_steps=200, total_steps=1000),
    ScheduleConfig(kind="cosine", init_lr=0.0, peak_lr=1e-3, end_lr=1e-4, warmup_steps=10,
                   total_steps=100),
    ScheduleConfig(kind="wsd", init_lr=0.0, peak_lr=1e-3, end_lr=1e-5, warmup_steps=10,
                   cooldown_steps=30, total_steps=100),
    ScheduleConfig(kind="wsd", peak_lr=1e-3, end_lr=0.0, warmup_steps=0, cooldown_steps=20,
                   cooldown="1-sqrt", total_steps=100),
    ScheduleConfig(kind="constant", init_lr=1e-4, peak_lr=1e-3, warmup_steps=5, total_steps=50),
])
def test_schedule_values_at_knots(cfg):
    knots = cfg.knots()
    got = _values(cfg, list(knots))
    # optax evaluates schedules in float32: a few ulps of rounding in its linear formula
    np.testing.assert_allclose(got, list(knots.values()), rtol=1e-5, atol=1e-12)


def test_rewarm_shape_between_knots():
    cfg = ScheduleConfig(kind="rewarm", init_lr=3e-5, peak_lr=3e-4, end_lr=3e-5,
                         warmup_steps=100, hold_steps=100, total_steps=1000)
    steps = [0, 50, 100, 150, 200, 600, 1000, 1200]
    init, peak, end = 3e-5, 3e-4, 3e-5
    frac = (600 - 200) / 800
    want = [init, (init + peak) / 2, peak, peak, peak,
            end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac)), end, end]
    np.testing.assert_allclose(_values(cfg, steps), want, rtol=1e-5)


def test_wsd_sqrt_cooldown_formula():
    cfg = ScheduleConfig(kind="wsd", peak_lr=1e-3, end_lr=1e-4, warmup_steps=0,
                         cooldown_steps=100, cooldown="1-sqrt", total_steps=300)
    got = _values(cfg, [199, 225, 300])
    want = [1e-3, 1e-4 + 9e-4 * (1 - math.sqrt(25 / 100)), 1e-4]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_schedule_errors_name_the_key():
    with pytest.raises(ConfigError, match="schedule.kind"):
        ScheduleConfig(kind="linearr")
    with pytest.raises(ConfigError, match="exceed total_steps"):
        ScheduleConfig(kind="wsd", warmup_steps=60, cooldown_steps=60, total_steps=100)
