"""The distillation train step: its gradient is jax.grad of a plain reference loss, it gives the
same step on one device and on data=2,fsdp=2,tensor=2, and the teacher is a sharded frozen input
that the optimizer never sees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxarith.distill import losses as D
from jaxarith.models import transformer
from jaxarith.models.config import config_from_hf
from jaxarith.schedules import ScheduleConfig
from jaxarith.sharding import make_mesh
from jaxarith.testing import tiny_gpt2_config, tiny_llama_config
from train import distill as TD
from train.config import OptimizerConfig
from train.step import build_step, compile_step, init_state, make_optimizer, scratch_params

STUDENT = config_from_hf(tiny_llama_config(num_hidden_layers=1, hidden_size=32,
                                           intermediate_size=64, head_dim=8).to_dict())
# a different architecture, depth and width; the same vocabulary
TEACHER = config_from_hf(tiny_gpt2_config(n_layer=3).to_dict())
V = STUDENT.vocab_size
REAL_V = V - 3  # pretend the last 3 rows are embedding padding
BATCH, SEQ = 8, 16
SCHED = ScheduleConfig(kind="constant", peak_lr=1e-3, total_steps=10).build()
TOKENS = np.random.default_rng(0).integers(0, REAL_V, (BATCH, SEQ)).astype(np.int32)
OPTS = D.DistillLoss(loss="forward_kl", temperature=2.0, alpha=0.7)


def build(mesh, tx, microbatches=1, opts=OPTS):
    loss_fn = TD.make_loss_fn(STUDENT, opts, teacher_cfg=TEACHER, vocab_size=REAL_V)
    frozen = {TD.NAME: TD.abstract_teacher(TEACHER, mesh)}
    fns = build_step(STUDENT, mesh, tx=tx, schedule=SCHED, batch=BATCH, seq_len=SEQ,
                     microbatches=microbatches, loss_fn=loss_fn, frozen=frozen,
                     frozen_shardings={TD.NAME: TD.teacher_shardings(TEACHER, mesh)})
    return fns, compile_step(fns, mesh)[0]


def run(spec, tx, microbatches=1):
    mesh = make_mesh(spec or "fsdp=1", jax.devices()[:1] if spec is None else None)
    fns, step = build(mesh, tx, microbatches)
    teacher = jax.device_put(transformer.init_params(TEACHER, jax.random.key(7)),
                             TD.teacher_shardings(TEACHER, mesh))
    state = init_state(fns, scratch_params(STUDENT, 0, mesh), mesh, frozen={TD.NAME: teacher})
    tok = TOKENS.reshape(BATCH // microbatches, microbatches, SEQ).transpose(1, 0, 2)
    new, metrics = step(state, {"tokens": jax.device_put(tok, fns.batch_sharding["tokens"])})
    return fns, mesh, new, jax.device_get(metrics)


def plain_reference_loss(params, teacher):
    """alpha * tau^2 * KL(p_T || p_S) + (1 - alpha) * CE, mean over predicted tokens, written
    directly with slicing to the real vocabulary."""
    tau = OPTS.temperature
    s = transformer.forward(params, STUDENT, jnp.asarray(TOKENS))[0][:, :-1, :REAL_V]
    t = transformer.forward(teacher, TEACHER, jnp.asarray(TOKENS))[0][:, :-1, :REAL_V]
    ls, lt = jax.nn.log_softmax(s / tau), jax.nn.log_softmax(t / tau)
    kl = jnp.sum(jnp.exp(lt) * (lt - ls), -1)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(s), TOKENS[:, 1:, None], -1)[..., 0]
    return jnp.mean(OPTS.alpha * tau ** 2 * kl + (1 - OPTS.alpha) * ce)


@pytest.mark.slow  # moved out of `make test` (its ~10 min budget); CI runs it (make test-slow)
def test_step_gradient_is_grad_of_plain_reference_loss():
    # SGD with lr 1 and no clipping: new params = params - grad, with the step's accumulation
    # over 2 microbatches
    _, _, new, metrics = run(None, optax.sgd(1.0), microbatches=2)
    params = scratch_params(STUDENT, 0)
    teacher = transformer.init_params(TEACHER, jax.random.key(7))
    ref_loss, ref_grad = jax.value_and_grad(plain_reference_loss)(params, teacher)
    grad = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params,
                        jax.device_get(new.params))
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grad), jax.tree.leaves(ref_grad),
                            strict=True):
        np.testing.assert_allclose(g, np.asarray(r), rtol=1e-5, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    assert metrics["loss"] == pytest.approx(float(ref_loss), rel=1e-5)
    assert metrics["loss"] == pytest.approx(
        OPTS.alpha * metrics["distill_loss"] + (1 - OPTS.alpha) * metrics["ce"], rel=1e-5)
    assert set(metrics) >= {"distill_loss", "ce", "kl_t1", "loss"}
    # teacher unchanged
    np.testing.assert_array_equal(np.asarray(new.frozen[TD.NAME]["embed"]),
                                  np.asarray(teacher["embed"]))


@pytest.fixture(scope="module")
def adam():
    return make_optimizer(OptimizerConfig(eps=1e-6), SCHED)


def test_sharded_step_equals_one_device_and_teacher_is_frozen(adam):
    _, _, one, m1 = run(None, adam)
    fns, mesh, eight, m8 = run("data=2,fsdp=2,tensor=2", adam)
    for k in ("loss", "distill_loss", "ce", "kl_t1", "grad_norm"):
        assert m8[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(eight.params)),
                            jax.tree.leaves(jax.device_get(one.params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # the teacher carries its logical-axis shardings on the 8-device mesh ...
    want = TD.teacher_shardings(TEACHER, mesh)
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(eight.frozen[TD.NAME]),
                            jax.tree.leaves(want), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim), jax.tree_util.keystr(path)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(eight.frozen))
    # ... and is nowhere in the optimizer state: its moments have exactly the student's shapes
    student_shapes = sorted(x.shape for x in jax.tree.leaves(eight.params))
    mu = [x.shape for x in jax.tree.leaves(eight.opt_state) if x.ndim > 0]
    assert sorted(mu) == sorted(student_shapes * 2)  # Adam's mu and nu


def test_vocab_mismatch_and_top_k_errors():
    other = config_from_hf(tiny_gpt2_config(vocab_size=V + 64).to_dict())
    with pytest.raises(Exception, match=f"{V + 64} entries but the student's has {V}"):
        TD.check_vocab(STUDENT, other, "t")
    with pytest.raises(Exception, match=f"top_k={V + 1} exceeds the vocabulary size {V}"):
        TD.check_vocab(STUDENT, TEACHER, "t", top_k=V + 1)
    with pytest.raises(Exception, match="unknown loss"):
        TD.DistillSection(teacher="x", loss="kl")
    with pytest.raises(Exception, match="not both"):
        TD.DistillSection(teacher="x", cache="y")
