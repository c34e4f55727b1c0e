"""The loop's extension points: an extension's loss, frozen tree, initial params and hooks reach
the run; frozen trees stay out of checkpoints and are re-supplied on resume; the eval honours loss
weights; the data example's per-token fields become batch fields."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxarith.errors import ConfigError
from train import loop
from train.config import load_train_config
from train.extensions import Extension, Hook
from train.step import next_token_loss_fn

ROOT = os.path.join(os.path.dirname(__file__), "..")
LLAMA = os.path.join(ROOT, "configs", "tiny_llama.yaml")
FAST = ["batch=8", "data.seq_len=64", "data.sources.code.max_docs=600",
        "data.sources.replay.max_docs=300", "eval.batches=1", "log.every=2",
        "log.progress=false", "checkpoint.every=2", "schedule.total_steps=40",
        "schedule.peak_lr=1e-2", "schedule.warmup_steps=5", "steps=4", "eval.at_end=false",
        "log.plot=false", "log.tensorboard=false"]
MARKER = np.arange(3, dtype=np.float32) + 0.5  # sum 4.5


def _extension(calls: list):
    def loss(model_cfg, *, dtype, remat):
        base = next_token_loss_fn(model_cfg, dtype=dtype, remat=remat)

        def fn(params, frozen, batch):
            s, n, _ = base(params, frozen, batch)
            # metrics are sums over tokens: n * x logs as x
            return s, n, {"twice_loss": 2.0 * s, "marker_sum": n * jnp.sum(frozen["probe"]["w"])}

        return fn

    def frozen(cfg, model_cfg, mesh):
        calls.append("frozen")
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return {"w": jax.device_put(MARKER, rep)}

    def init_params(cfg, model_cfg, mesh):
        calls.append("init")
        params = loop.scratch_params(model_cfg, cfg.seed, mesh)
        return dict(params, embed=jnp.zeros_like(params["embed"]))

    def every_two(ctx):
        return {"probe/step_seen": float(ctx.step), "probe/final": float(ctx.final)}

    return Extension(name="probe", loss=loss, loss_key="probe-v1", frozen=frozen,
                     init_params=init_params,
                     hooks=(Hook(name="probe", every=2, fn=every_two, at_end=True),))


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_extension_loss_frozen_init_and_hooks(tmp_path):
    calls, seen = [], {}
    out = tmp_path / "run"
    cfg = load_train_config(LLAMA, [*FAST, f"out={out}"])

    def crash(step, host):
        seen[step] = host
        if step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        loop.run(cfg, on_step=crash, extensions=[_extension(calls)])
    assert calls == ["frozen", "init"]
    # zero embeddings: every hidden state is 0, every logit 0, so the first loss is ln(vocab)
    np.testing.assert_allclose(seen[1]["loss"], np.log(1024), rtol=1e-6)
    np.testing.assert_allclose(seen[1]["twice_loss"], 2 * seen[1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(seen[1]["marker_sum"], 4.5, rtol=1e-6)
    # the checkpoint at step 2 does not contain the frozen tree
    ckpt = out / "checkpoints" / "2"
    names = [os.path.join(d, f) for d, _, fs in os.walk(ckpt) for f in fs]
    text = "".join(open(n, errors="ignore").read() for n in names if n.endswith("METADATA")
                   or "metadata" in os.path.basename(n).lower())
    assert "probe" not in text and "params" in text  # `frozen` is saved as an empty dict

    calls.clear()
    res = loop.run(cfg, extensions=[_extension(calls)])  # resume: frozen re-supplied, no init
    assert calls == ["frozen"]
    assert sorted(res["batches"]) == [3, 4]
    np.testing.assert_array_equal(np.asarray(res["state"].frozen["probe"]["w"]), MARKER)
    recs = _records(out)
    probe = [r for r in recs if "probe/step_seen" in r]
    assert [(r["step"], r["probe/step_seen"], r["probe/final"]) for r in probe] == \
        [(2, 2.0, 0.0), (4, 4.0, 1.0)]  # the last step runs in the end phase (final)
    logged = [r for r in recs if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for r in logged:  # the loss function's own metrics are logged as given
        np.testing.assert_allclose(r["twice_loss"], 2 * r["loss"], rtol=1e-6)
        np.testing.assert_allclose(r["marker_sum"], 4.5, rtol=1e-6)


def test_two_extensions_cannot_both_set_the_loss(tmp_path):
    cfg = load_train_config(LLAMA, [*FAST, f"out={tmp_path}"])
    a, b = _extension([]), _extension([])
    b = Extension(name="other", loss=b.loss)
    with pytest.raises(ConfigError, match="both probe and other set the run's loss"):
        loop.run(cfg, extensions=[a, b])


def test_batch_fields_come_from_the_example():
    ex = {"tokens": np.zeros(8, np.int32), "source": np.int32(0),
          "weights": np.ones(8, np.float32), "topk": np.zeros((8, 4), np.int32)}
    assert loop.batch_fields(ex, 8) == {"tokens": ((), "int32"), "weights": ((), "float32"),
                                        "topk": ((4,), "int32")}
    need = Extension(name="distill", batch_fields={"teacher_logp": ((4,), "float32")})
    with pytest.raises(ConfigError, match="distill needs the batch field 'teacher_logp'"):
        loop.batch_fields(ex, 8, [need])


def test_eval_honours_loss_weights():
    from jaxarith.models.config import config_from_hf
    from jaxarith.sharding import make_mesh
    from jaxarith.testing import tiny_llama_config

    cfg = config_from_hf(tiny_llama_config().to_dict())
    mesh = make_mesh("fsdp=1", jax.devices()[:1])
    params = loop.scratch_params(cfg, 0, mesh)
    evaluate = loop.make_eval(cfg, mesh, 4, 16, "float32")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (6, 16)).astype(np.int32)
    plain = evaluate(params, tokens)
    assert evaluate(params, {"tokens": tokens, "weights": np.ones((6, 16), np.float32)}) \
        == pytest.approx(plain, rel=1e-6)
    # zero weight on rows 0-2: the loss of rows 3-5 alone (every target token weighs 1)
    w = np.zeros((6, 16), np.float32)
    w[3:] = 1.0
    assert evaluate(params, {"tokens": tokens, "weights": w}) == \
        pytest.approx(evaluate(params, tokens[3:]), rel=1e-6)
    # weights on later target positions only: the weighted mean of per-token NLLs computed in
    # float64 numpy from the forward's logits
    w2 = np.zeros((6, 16), np.float32)
    w2[:, 8:] = 2.0
    from jaxarith.models import transformer

    logits = np.asarray(transformer.forward(params, cfg, tokens)[0], np.float64)
    mx = logits.max(-1, keepdims=True)
    lp = logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))
    nll = -np.take_along_axis(lp[:, :-1], tokens[:, 1:, None].astype(np.int64), -1)[..., 0]
    want = (nll * w2[:, 1:]).sum() / w2[:, 1:].sum()
    assert evaluate(params, {"tokens": tokens, "weights": w2}) == pytest.approx(want, rel=1e-5)


def test_compiled_step_cache_key_includes_the_loss_key_and_frozen_shapes():
    """Two runs share a compiled step only if their loss keys and frozen shapes agree (the
    factory functions themselves are new objects in every run)."""
    from train.extensions import Keyed

    f, g = (lambda: 1), (lambda: 2)
    assert Keyed(("distill", (2.0, "kl")), f) == Keyed(("distill", (2.0, "kl")), g)
    assert hash(Keyed(("distill", 1), f)) == hash(Keyed(("distill", 1), g))
    assert Keyed(("distill", (2.0, "kl")), f) != Keyed(("distill", (1.0, "kl")), f)
    a = loop._tree_key(loop._abstract({"t": np.zeros((2, 3), np.float32)}))
    b = loop._tree_key(loop._abstract({"t": np.zeros((2, 4), np.float32)}))
    assert a != b and a == loop._tree_key(loop._abstract({"t": np.ones((2, 3), np.float32)}))


def test_the_compiled_step_is_keyed_by_one_frozen_key():
    """Equal configs give one StepKey (one compiled program); anything that shapes the step
    gives another."""
    from jaxarith.sharding import make_mesh
    from train.step import TOKENS_ONLY

    def key(*extra):
        cfg = load_train_config(LLAMA, [*FAST, "out=unused", *extra])
        mesh = make_mesh(cfg.mesh)
        return loop.step_key(cfg, loop.model_config(cfg)[0], mesh, None, dict(TOKENS_ONLY), {})

    a, b = key(), key()
    assert a == b and hash(a) == hash(b)
    assert key("batch=16") != a and key("model.remat=true") != a
    assert key("model.attention=xla") == a  # auto resolves to xla on the CPU
