"""Weight averagers: EMA and SWA against plain numpy formulas, jitted, immutable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxarith.average.averagers import EMA, SWA, make_averager
from jaxarith.errors import ConfigError


def _snapshots(n=6):
    rng = np.random.default_rng(0)
    return [{"w": rng.normal(size=(3, 4)).astype(np.float32), "b": {"x": np.float32(i)}}
            for i in range(n)]


def test_ema_matches_formula_and_is_jittable():
    snaps = _snapshots()
    ema = EMA.init(snaps[0], decay=0.9)
    update = jax.jit(lambda e, p, s: e.update(p, s))
    want = snaps[0]["w"].astype(np.float64)
    for step, p in enumerate(snaps[1:], 1):
        new = update(ema, p, jnp.int32(step))
        assert new is not ema and isinstance(new, EMA) and new.decay == 0.9
        ema = new
        want = 0.9 * want + 0.1 * p["w"]
    np.testing.assert_allclose(ema.value()["w"], want, rtol=1e-6)


def test_ema_warmup_ramps_the_decay():
    snaps = _snapshots(3)
    ema = EMA.init(snaps[0], decay=0.999, warmup=True).update(snaps[1], 1)
    d = min(0.999, 2 / 11)
    np.testing.assert_allclose(ema.params["w"], d * snaps[0]["w"] + (1 - d) * snaps[1]["w"],
                               rtol=1e-6)


def test_swa_is_the_mean_of_the_snapshots_it_takes():
    snaps = _snapshots(8)
    swa = SWA.init(snaps[0], start=2, every=2)
    update = jax.jit(lambda a, p, s: a.update(p, s))
    for step, p in enumerate(snaps[1:], 1):
        swa = update(swa, p, jnp.int32(step))
    taken = [snaps[s]["w"] for s in (2, 4, 6)]
    np.testing.assert_allclose(swa.value()["w"], np.mean(taken, axis=0), rtol=1e-6)
    assert int(swa.count) == 3


def test_make_averager_by_name():
    p = _snapshots(1)[0]
    assert make_averager("none", p) is None
    assert isinstance(make_averager("ema", p, decay=0.5), EMA)
    with pytest.raises(ConfigError, match="average.kind=.bogus."):
        make_averager("bogus", p)
    with pytest.raises(ConfigError, match="decay"):
        EMA.init(p, decay=1.0)
