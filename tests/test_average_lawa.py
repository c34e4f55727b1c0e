"""LaWA (latest-weight averaging) against a float64 numpy mean of the last k snapshots: as a
jitted averager, inside the compiled train step on 1 and 8 devices (ring buffer sharded like the
parameters), across a checkpoint resume; and the ``average:`` config classes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxarith.average.averagers import LaWA, LaWAConfig, SWAConfig
from jaxarith.errors import ConfigError
from jaxarith.models import transformer
from jaxarith.models.config import config_from_hf
from jaxarith.schedules import ScheduleConfig
from jaxarith.sharding import make_mesh
from jaxarith.testing import tiny_llama_config
from train.checkpoint import Checkpoints
from train.config import OptimizerConfig, from_dict, to_dict
from train.step import (
    build_step,
    compile_step,
    init_state,
    make_optimizer,
    next_token_loss_fn,
    scratch_params,
)


def _expected(snapshots: dict[int, dict], k: int, every: int, start: int, step: int):
    """Numpy (float64): mean of the k latest snapshots taken at start, start+every, ... <= step."""
    taken = [s for s in sorted(snapshots) if s >= max(start, 1) and (s - start) % every == 0
             and s <= step][-k:]
    if not taken:  # before the first snapshot: the weights last seen
        return snapshots[step]
    return jax.tree.map(lambda *xs: np.mean(np.stack(xs).astype(np.float64), axis=0),
                        *[snapshots[s] for s in taken])


def _close(got, want, rtol=2e-6, atol=1e-7):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("k,every,start", [(3, 2, 0), (4, 1, 0), (2, 3, 4), (1, 2, 0)])
def test_lawa_is_the_mean_of_the_latest_k_snapshots(k, every, start):
    rng = np.random.default_rng(k * 10 + every)
    snaps = {s: {"w": rng.normal(size=(3, 5)).astype(np.float32),
                 "n": {"b": rng.normal(size=(4,)).astype(np.float32)}} for s in range(15)}
    avg = LaWA.init(snaps[0], k=k, every=every, start=start)
    _close(avg.value(), _expected(snaps, k, every, start, 0))
    update = jax.jit(lambda a, p, s: a.update(p, s))
    for step in range(1, 15):
        new = update(avg, snaps[step], jnp.int32(step))
        assert isinstance(new, LaWA) and new is not avg and (new.k, new.every) == (k, every)
        avg = new
        _close(avg.value(), _expected(snaps, k, every, start, step))  # also before k exist
    assert int(avg.count) == len([s for s in range(1, 15) if s >= start
                                  and (s - start) % every == 0])


def test_lawa_rejects_bad_options():
    with pytest.raises(ConfigError, match="k=0"):
        LaWA.init({"w": np.zeros(2)}, k=0)
    with pytest.raises(ConfigError, match="every=0"):
        LaWAConfig(k=2, every=0)


def test_average_section_is_one_class_per_method(caplog):
    base = {"out": "/tmp/x", "steps": 10, "batch": 2, "model": {"arch": "llama"},
            "data": {"sources": {"a": {"kind": "text", "path": "bundled:code"}}}}
    cfg = from_dict({**base, "average": {"kind": "lawa", "k": 5, "every": 200}})
    assert cfg.average == LaWAConfig(k=5, every=200)
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(base).average.kind == "none"
    # switching the method from the command line drops the other method's keys, with a warning
    cfg = from_dict({**base, "average": {"kind": "ema", "decay": 0.9}},
                    ["average.kind=swa", "average.every=4"])
    assert cfg.average == SWAConfig(every=4)
    assert "average.decay" not in caplog.text or "ignored" in caplog.text
    with pytest.raises(ConfigError, match="average.kind='lawq'"):
        from_dict({**base, "average": {"kind": "lawq"}})
    with pytest.raises(ConfigError, match="unknown config key average.kk"):
        from_dict({**base, "average": {"kind": "lawa", "kk": 3}})


# ----------------------------------------------------------------------------- in the train step

CFG = config_from_hf(tiny_llama_config().to_dict())
BATCH, SEQ, K, EVERY = 8, 16, 3, 2
SCHED = ScheduleConfig(kind="constant", peak_lr=3e-3, total_steps=20).build()
TX = make_optimizer(OptimizerConfig(eps=1e-6), SCHED)


def _setup(spec):
    mesh = make_mesh(spec or "fsdp=1", jax.devices()[:1] if spec is None else None)
    fns = build_step(CFG, mesh, tx=TX, schedule=SCHED, batch=BATCH, seq_len=SEQ,
                     loss_fn=next_token_loss_fn(CFG),
                     average=("lawa", {"k": K, "every": EVERY, "start": 0}))
    step, _ = compile_step(fns, mesh)
    return fns, step, mesh


def _batch(fns, step):
    tok = np.random.default_rng(step).integers(0, CFG.vocab_size, (1, BATCH, SEQ), np.int32)
    return {"tokens": jax.device_put(tok, fns.batch_sharding["tokens"])}


@pytest.mark.parametrize("spec", [None, "data=2,fsdp=2,tensor=2"], ids=["1dev", "8dev"])
def test_lawa_in_the_step_and_across_a_resume(spec, tmp_path):
    fns, step, mesh = _setup(spec)
    value = jax.jit(lambda avg: avg.value())
    state = init_state(fns, scratch_params(CFG, 0, mesh), mesh)
    pshd = transformer.param_shardings(CFG, mesh)
    for buf, shd in zip(jax.tree.leaves(state.average.buffer), jax.tree.leaves(pshd),
                        strict=True):
        assert buf.shape[0] == K and buf.sharding.spec == PartitionSpec(None, *shd.spec)
    snaps = {0: jax.device_get(state.params)}
    with Checkpoints(str(tmp_path / "ck"), keep=1, async_save=False) as ckpts:
        for s in range(1, 5):
            state, _ = step(state, _batch(fns, s))
            snaps[s] = jax.device_get(state.params)
            _close(jax.device_get(value(state.average)), _expected(snaps, K, EVERY, 0, s))
        ckpts.save(4, state, {"next_index": 0}, {})
        del state
        state, _, _ = ckpts.restore(fns.abstract_state)
    for s in range(5, 10):  # resumed: the ring buffer and its count came back from disk
        state, _ = step(state, _batch(fns, s))
        snaps[s] = jax.device_get(state.params)
        _close(jax.device_get(value(state.average)), _expected(snaps, K, EVERY, 0, s))
    assert int(state.average.count) == 4  # steps 2, 4, 6, 8: the ring of 3 wrapped
    for buf, shd in zip(jax.tree.leaves(state.average.buffer), jax.tree.leaves(pshd),
                        strict=True):
        assert buf.sharding.spec == PartitionSpec(None, *shd.spec)
