"""The jitted train step: same loss and params on 1 and 8 devices, exact gradient accumulation,
weight-decay masks, skipping non-finite steps, and refusing batches the mesh cannot split."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxarith.models import transformer
from jaxarith.models.config import config_from_hf
from jaxarith.schedules import ScheduleConfig
from jaxarith.sharding import make_mesh
from jaxarith.testing import tiny_gpt2_config, tiny_llama_config
from train.config import OptimizerConfig
from train.step import (
    build_step,
    compile_step,
    decay_mask,
    init_state,
    make_optimizer,
    next_token_loss_fn,
    scratch_params,
)

CFG = config_from_hf(tiny_llama_config().to_dict())
BATCH, SEQ = 8, 32
SCHED = ScheduleConfig(kind="constant", peak_lr=1e-3, total_steps=10).build()
# Adam's first update is g / (|g| + eps): with eps far below the gradients' float32 rounding
# error (1e-8) a sign can flip on one layout and not another; 1e-6 keeps the comparison about
# sharding, not about that amplification.
TX = make_optimizer(OptimizerConfig(weight_decay=0.1, clip_norm=1.0, eps=1e-6), SCHED)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (BATCH, SEQ)).astype(np.int32)


def compiled(spec, microbatches=1):
    """(fns, compiled step, mesh, info) on a mesh (None: one device); skip_nonfinite on."""
    devices = jax.devices()[:1] if spec is None else None
    mesh = make_mesh(spec or "fsdp=1", devices)
    fns = build_step(CFG, mesh, tx=TX, schedule=SCHED, batch=BATCH, seq_len=SEQ,
                     microbatches=microbatches, loss_fn=next_token_loss_fn(CFG),
                     average=("ema", {"decay": 0.5}), skip_nonfinite=True)
    step, info = compile_step(fns, mesh)
    return fns, step, mesh, info


def run_step(setup, params=None, tokens=TOKENS):
    fns, step, mesh, _ = setup
    m = fns.abstract_batch["tokens"].shape[0]
    params = scratch_params(CFG, 0, mesh) if params is None else \
        jax.device_put(params, transformer.param_shardings(CFG, mesh))
    state = init_state(fns, params, mesh)
    # rows j * M + m go to microbatch m: the same split the loop makes of its local batch
    tok = tokens.reshape(BATCH // m, m, SEQ).transpose(1, 0, 2)
    new, metrics = step(state, {"tokens": jax.device_put(tok, fns.batch_sharding["tokens"])})
    return jax.device_get(new), jax.device_get(metrics)


@pytest.fixture(scope="module")
def one_device():
    return compiled(None)


@pytest.fixture(scope="module")
def reference(one_device):
    return run_step(one_device)


def _assert_trees_close(a, b, tol):
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree.leaves(b)
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol,
                                   err_msg=jax.tree_util.keystr(path))


def test_reference_step_matches_plain_formula(one_device, reference):
    state, metrics = reference
    info = one_device[3]
    params0 = jax.device_get(scratch_params(CFG, 0))
    nll, n = jax.jit(transformer.next_token_loss, static_argnums=1)(params0, CFG, TOKENS)
    np.testing.assert_allclose(metrics["loss"], float(nll / n), rtol=1e-6)
    assert metrics["tokens"] == BATCH * (SEQ - 1) and metrics["finite"]
    assert int(state.step) == 1
    # EMA with decay 0.5 after one step: halfway between the start and the new params
    want = jax.tree.map(lambda p0, p1: 0.5 * np.asarray(p0) + 0.5 * p1, params0, state.params)
    _assert_trees_close(state.average.params, want, 1e-6)
    assert info["flops"] is None or info["flops"] > 0


@pytest.mark.parametrize("spec", ["data=2,fsdp=2,tensor=2", "fsdp=8"])
def test_sharded_step_equals_one_device(reference, spec):
    state, metrics = run_step(compiled(spec))
    ref_state, ref_metrics = reference
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5, atol=1e-5)
    _assert_trees_close(state.params, ref_state.params, 1e-5)
    _assert_trees_close(state.opt_state, ref_state.opt_state, 1e-5)


def test_gradient_accumulation_equals_big_batch(reference):
    state, metrics = run_step(compiled(None, microbatches=4))
    ref_state, ref_metrics = reference
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    assert metrics["tokens"] == ref_metrics["tokens"]
    _assert_trees_close(state.params, ref_state.params, 1e-6)
    _assert_trees_close(state.opt_state, ref_state.opt_state, 1e-6)


def test_nonfinite_step_is_skipped(one_device):
    params0 = jax.device_get(scratch_params(CFG, 0))
    params0["final_norm"]["scale"] = params0["final_norm"]["scale"].copy()
    params0["final_norm"]["scale"][3] = np.nan  # poisons the loss and every gradient
    state, metrics = run_step(one_device, params=params0)
    assert not metrics["finite"] and int(state.step) == 1
    np.testing.assert_array_equal(np.asarray(state.params["embed"]), params0["embed"])
    np.testing.assert_array_equal(np.asarray(state.opt_state[1][0].mu["embed"]), 0.0)
    assert int(state.opt_state[1][0].count) == 0  # Adam's count unchanged


def test_weight_decay_mask_skips_norms_and_biases():
    for hf in (tiny_llama_config(attention_bias=True, mlp_bias=True), tiny_gpt2_config()):
        cfg = config_from_hf(hf.to_dict())
        mask = decay_mask(transformer.abstract_params(cfg))
        flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
        for name, decayed in flat.items():
            is_norm_or_bias = "norm" in name or name.endswith("bias']")
            assert decayed != is_norm_or_bias, name
        assert flat["['layers']['attn']['q']"] and flat["['embed']"]


def test_batch_that_does_not_fit_the_mesh_is_refused_before_compiling():
    from jaxarith.errors import ConfigError

    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    with pytest.raises(ConfigError, match="not divisible by the data-parallel size 4"):
        build_step(CFG, mesh, tx=TX, schedule=SCHED, batch=6, seq_len=SEQ,
                   loss_fn=next_token_loss_fn(CFG))
    with pytest.raises(ConfigError, match="microbatches=3"):
        build_step(CFG, mesh, tx=TX, schedule=SCHED, batch=8, seq_len=SEQ, microbatches=3,
                   loss_fn=next_token_loss_fn(CFG))


def test_state_is_a_plain_pytree_with_extension_fields(reference):
    state = reference[0]
    assert dataclasses.fields(state)[-1].name == "frozen" and state.frozen == {}
    assert jax.tree.structure(state.average.params) == jax.tree.structure(state.params)


def test_loss_weights_and_metrics_interface_against_transformers(llama_dir):
    """``batch["weights"]`` weighs target tokens; the loss equals transformers' per-token NLL
    averaged with those weights (float64 numpy from the HF logits, 1e-5), and extra metrics from
    ``loss_fn`` come back summed over microbatches and divided by the total count."""
    from jaxarith.io.refs import load_model
    from jaxarith.testing import hf_logits

    directory, hf = llama_dir
    model = load_model(directory)
    cfg = model.config
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (BATCH, SEQ)).astype(np.int32)
    weights = (rng.random((BATCH, SEQ)) < 0.4).astype(np.float32)
    logits = np.asarray(hf_logits(hf, tokens), np.float64)
    mx = logits.max(-1, keepdims=True)
    lp = logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))
    nll = -np.take_along_axis(lp[:, :-1], tokens[:, 1:, None].astype(np.int64), -1)[..., 0]
    w = weights[:, 1:]
    want = (nll * w).sum() / w.sum()

    base = next_token_loss_fn(cfg)

    def loss_fn(p, frozen, batch):
        s, n, _ = base(p, frozen, batch)
        return s, n, {"weighted_twice": 2.0 * s, "count_metric": n}

    mesh = make_mesh("fsdp=1", jax.devices()[:1])
    fields = {"tokens": ((), "int32"), "weights": ((), "float32")}
    fns = build_step(cfg, mesh, tx=TX, schedule=SCHED, batch=BATCH, seq_len=SEQ,
                     microbatches=2, loss_fn=loss_fn, batch_fields=fields)
    step, _ = compile_step(fns, mesh)
    state = init_state(fns, jax.device_put(model.params, transformer.param_shardings(cfg, mesh)),
                       mesh)
    split = lambda x: x.reshape(BATCH // 2, 2, SEQ).transpose(1, 0, 2)
    batch = {"tokens": jax.device_put(split(tokens), fns.batch_sharding["tokens"]),
             "weights": jax.device_put(split(weights), fns.batch_sharding["weights"])}
    _, m = step(state, batch)
    m = jax.device_get(m)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m["tokens"], w.sum())
    np.testing.assert_allclose(m["weighted_twice"], 2 * want, rtol=1e-5)
    np.testing.assert_allclose(m["count_metric"], 1.0, rtol=1e-6)


def test_logged_lr_is_the_applied_lr_after_a_skipped_step():
    """A skipped (non-finite) step does not advance optax's schedule; the logged LR must follow
    it. Warmup 0 -> 1e-3 over 4 steps: the hand-written LRs are k * 2.5e-4 at schedule step k.
    Run A: batches b1, a poisoned batch (NaN loss weights), b3. Run B: b1, b3. A's params after
    3 steps equal B's after 2 (bitwise: the skipped step changed nothing, the LR applied at A's
    step 3 is B's at step 2), and A logs that LR."""
    sched = ScheduleConfig(kind="constant", init_lr=0.0, peak_lr=1e-3, warmup_steps=4,
                           total_steps=10).build()
    tx = make_optimizer(OptimizerConfig(eps=1e-6), sched)
    mesh = make_mesh("fsdp=1", jax.devices()[:1])
    fields = {"tokens": ((), "int32"), "weights": ((), "float32")}
    fns = build_step(CFG, mesh, tx=tx, schedule=sched, batch=BATCH, seq_len=SEQ,
                     loss_fn=next_token_loss_fn(CFG), skip_nonfinite=True, batch_fields=fields)
    step, _ = compile_step(fns, mesh)
    rng = np.random.default_rng(3)
    tok = [rng.integers(0, CFG.vocab_size, (1, BATCH, SEQ)).astype(np.int32) for _ in range(3)]
    ones = np.ones((1, BATCH, SEQ), np.float32)
    nan = np.full((1, BATCH, SEQ), np.nan, np.float32)

    def run(batches):
        state = init_state(fns, scratch_params(CFG, 0, mesh), mesh)
        lrs, finite = [], []
        for t, w in batches:
            state, m = step(state, {"tokens": jax.device_put(t, fns.batch_sharding["tokens"]),
                                    "weights": jax.device_put(w, fns.batch_sharding["weights"])})
            lrs.append(float(m["lr"]))
            finite.append(bool(m["finite"]))
        return jax.device_get(state), lrs, finite

    a, lrs_a, finite_a = run([(tok[0], ones), (tok[1], nan), (tok[2], ones)])
    b, lrs_b, _ = run([(tok[0], ones), (tok[2], ones)])
    assert finite_a == [True, False, True] and int(a.step) == 3
    np.testing.assert_allclose(lrs_a, [0.0, 2.5e-4, 2.5e-4], rtol=1e-6)
    np.testing.assert_allclose(lrs_b, [0.0, 2.5e-4], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _grads(loss_fn, params):
    def mean_loss(p):
        s, n, _ = loss_fn(p, {}, {"tokens": TOKENS})
        return s / n

    return jax.device_get(jax.jit(jax.value_and_grad(mean_loss))(params))


def _step_with(loss_fn):
    mesh = make_mesh("fsdp=1", jax.devices()[:1])
    fns = build_step(CFG, mesh, tx=TX, schedule=SCHED, batch=BATCH, seq_len=SEQ,
                     loss_fn=loss_fn, average=("ema", {"decay": 0.5}), skip_nonfinite=True)
    return fns, compile_step(fns, mesh)[0], mesh, {}


def test_bf16_compute_in_training_against_float32():
    """bfloat16 matmuls (float32 master weights): the train step's loss and gradient norm and
    every gradient tensor against float32. Tolerances: bf16 keeps 8 mantissa bits (relative
    rounding 2^-9 = 2e-3 per operation); the loss averages 1,984 token NLLs, so its error
    averages out (measured 1e-5 relative: bound 1e-3); per-tensor gradients accumulate roundings
    through 2 layers and the norms (measured at most 2.3% relative L2 error: bound 5%; cosine
    of the whole gradient measured 0.99998: bound 0.999). A bound from below (> 1e-4) proves
    the bf16 path really ran."""
    import jax.numpy as jnp

    params = jax.device_get(scratch_params(CFG, 0))
    f32, bf16 = next_token_loss_fn(CFG), next_token_loss_fn(CFG, dtype=jnp.bfloat16)
    (l32, g32), (l16, g16) = _grads(f32, params), _grads(bf16, params)
    np.testing.assert_allclose(l16, l32, rtol=1e-3)
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
    a, b = flat(g32), flat(g16)
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g32), jax.tree.leaves(g16),
                            strict=True):
        rel = np.linalg.norm(np.asarray(x) - y) / np.linalg.norm(x)
        assert 1e-4 < rel < 0.05, (jax.tree_util.keystr(path), rel)


def test_remat_in_training_against_no_remat(reference):
    """Rematerialised blocks recompute the same float32 forward in the backward pass: one train
    step gives the same loss, params and optimizer state (Adam's first moment is 0.1 x the
    gradient) to float32 reassociation (XLA fuses the recomputation differently; measured max
    abs gradient difference 9e-9): 1e-6."""
    state, metrics = run_step(_step_with(next_token_loss_fn(CFG, remat=True)))
    ref_state, ref_metrics = reference
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-7)
    _assert_trees_close(state.params, ref_state.params, 1e-6)
    _assert_trees_close(state.opt_state, ref_state.opt_state, 1e-6)
