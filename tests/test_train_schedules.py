"""Learning-rate schedules: the values at the knots the config names, and the shapes between."""

import math

import numpy as np
import pytest

from jaxarith.errors import ConfigError
from jaxarith.schedules import ScheduleConfig


def _values(cfg, steps):
    sched = cfg.build()
    return np.array([float(sched(s)) for s in steps])


# (config, {step: lr}) with the LRs written out by hand from the schedule's definition:
# linear warmup init -> peak, cosine end + (peak - end) * (1 + cos(pi * t / T)) / 2, linear or
# 1-sqrt cooldown; e.g. rewarm's 8.9547e-5 = 2e-4 * (1 + cos(pi * 400 / 750)) / 2.
TABLE = [
    (ScheduleConfig(kind="rewarm", init_lr=3e-5, peak_lr=3e-4, end_lr=3e-5, warmup_steps=100,
                    total_steps=1000),
     {0: 3e-5, 50: 1.65e-4, 100: 3e-4, 550: 1.65e-4, 1000: 3e-5}),
    (ScheduleConfig(kind="rewarm", init_lr=1e-5, peak_lr=2e-4, end_lr=0.0, warmup_steps=50,
                    hold_steps=200, total_steps=1000),
     {0: 1e-5, 25: 1.05e-4, 50: 2e-4, 250: 2e-4, 650: 8.954715e-5, 1000: 0.0}),
    (ScheduleConfig(kind="cosine", init_lr=0.0, peak_lr=1e-3, end_lr=1e-4, warmup_steps=10,
                    total_steps=100),
     {0: 0.0, 5: 5e-4, 10: 1e-3, 55: 5.5e-4, 100: 1e-4}),
    (ScheduleConfig(kind="wsd", init_lr=0.0, peak_lr=1e-3, end_lr=1e-5, warmup_steps=10,
                    cooldown_steps=30, total_steps=100),
     {0: 0.0, 10: 1e-3, 70: 1e-3, 85: 5.05e-4, 100: 1e-5}),
    (ScheduleConfig(kind="wsd", peak_lr=1e-3, end_lr=0.0, warmup_steps=0, cooldown_steps=20,
                    cooldown="1-sqrt", total_steps=100),
     {0: 1e-3, 80: 1e-3, 85: 5e-4, 100: 0.0}),
    (ScheduleConfig(kind="constant", init_lr=1e-4, peak_lr=1e-3, warmup_steps=5, total_steps=50),
     {0: 1e-4, 2: 4.6e-4, 5: 1e-3, 50: 1e-3}),
    # fractions of the run: 60 steps -> warmup 6, cooldown 12; 300 steps -> 30 and 60
    (ScheduleConfig(kind="wsd", peak_lr=1e-3, end_lr=1e-5, warmup_fraction=0.1,
                    cooldown_fraction=0.2, total_steps=60),
     {0: 0.0, 3: 5e-4, 6: 1e-3, 48: 1e-3, 54: 5.05e-4, 60: 1e-5}),
    (ScheduleConfig(kind="wsd", peak_lr=1e-3, end_lr=1e-5, warmup_fraction=0.1,
                    cooldown_fraction=0.2, total_steps=300),
     {15: 5e-4, 30: 1e-3, 240: 1e-3, 270: 5.05e-4, 300: 1e-5}),
    # a step count given beside a fraction wins
    (ScheduleConfig(kind="cosine", peak_lr=1e-3, warmup_steps=4, warmup_fraction=0.5,
                    total_steps=100),
     {2: 5e-4, 4: 1e-3}),
]


@pytest.mark.parametrize("cfg,table", TABLE)
def test_schedule_values_against_a_hand_written_table(cfg, table):
    got = _values(cfg, list(table))
    # optax evaluates schedules in float32: a few ulps of rounding in its linear formula
    np.testing.assert_allclose(got, list(table.values()), rtol=1e-5, atol=1e-12)


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
    with pytest.raises(ConfigError, match="schedule.warmup_fraction=1.5"):
        ScheduleConfig(warmup_fraction=1.5)
