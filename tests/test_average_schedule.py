"""The SWA learning-rate phase (``schedule.kind: swa``) against the paper's formulas written out
by hand, and ``swa_start`` taken from ``average.start``."""

import math

import pytest

from jaxarith.errors import ConfigError
from jaxarith.schedules import ScheduleConfig
from train.config import from_dict

PEAK, SWA_LR, WARM, START, TOTAL = 1e-2, 1e-3, 5, 20, 40


def _lr(cfg, n):
    return float(cfg.build()(n))


def _cosine(n):  # optax.cosine_decay_schedule(PEAK, START - WARM, alpha=SWA_LR / PEAK)
    k = min(n - WARM, START - WARM) / (START - WARM)
    a = SWA_LR / PEAK
    return PEAK * ((1 - a) * 0.5 * (1 + math.cos(math.pi * k)) + a)


@pytest.mark.parametrize("cycle", [0, 4])
def test_swa_schedule_by_hand(cycle):
    cfg = ScheduleConfig(kind="swa", peak_lr=PEAK, swa_lr=SWA_LR, warmup_steps=WARM,
                         swa_start=START, swa_cycle=cycle, total_steps=TOTAL)
    for n in range(WARM):
        assert _lr(cfg, n) == pytest.approx(PEAK * n / WARM, rel=1e-5, abs=1e-12)
    for n in range(WARM, START):
        assert _lr(cfg, n) == pytest.approx(_cosine(n), rel=1e-5)
    for n in range(START, TOTAL):
        if cycle == 0:
            want = SWA_LR
        else:  # update r = n - START + 1 of the SWA phase: t = (mod(r - 1, c) + 1) / c
            t = ((n - START) % cycle + 1) / cycle
            want = (1 - t) * PEAK + t * SWA_LR
        assert _lr(cfg, n) == pytest.approx(want, rel=1e-5), n


def test_swa_snapshots_fall_on_the_cycles_low_end():
    """The weights after step START + j*c were made with swa_lr (lr of update n = step - 1)."""
    cfg = ScheduleConfig(kind="swa", peak_lr=PEAK, swa_lr=SWA_LR, warmup_steps=WARM,
                         swa_start=START, swa_cycle=4, total_steps=TOTAL)
    for step in range(START + 4, TOTAL + 1, 4):
        assert _lr(cfg, step - 1) == pytest.approx(SWA_LR, rel=1e-6)


def test_swa_start_comes_from_the_average_section():
    base = {"out": "/tmp/x", "steps": TOTAL, "batch": 2, "model": {"arch": "llama"},
            "data": {"sources": {"a": {"kind": "text", "path": "bundled:code"}}},
            "schedule": {"kind": "swa", "peak_lr": PEAK, "swa_lr": SWA_LR, "swa_cycle": 4,
                         "warmup_steps": WARM}}
    cfg = from_dict({**base, "average": {"kind": "swa", "start": START, "every": 4}})
    assert cfg.schedule.swa_start == START and cfg.schedule.total_steps == TOTAL
    with pytest.raises(ConfigError, match="swa_start"):
        from_dict({**base, "average": {"kind": "ema"}}).schedule.build()
    with pytest.raises(ConfigError, match="swa_start=50"):
        from_dict({**base, "schedule": {**base["schedule"], "swa_start": 50}})
