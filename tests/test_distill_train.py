"""Distillation through the training program: a distilled student ends closer to its teacher
than the same student trained on CE alone; the offline top-k cache gives the live teacher's
losses; resume works with both; the teacher is never checkpointed; bad input is refused early."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxarith.data.pipeline import load_sources
from jaxarith.distill import cache as distill_cache
from jaxarith.distill import losses as D
from jaxarith.errors import ConfigError, JaxarithError
from jaxarith.io.refs import load_model
from jaxarith.models import transformer
from train import loop
from train.config import load_train_config

ROOT = os.path.join(os.path.dirname(__file__), "..")
LLAMA = os.path.join(ROOT, "configs", "tiny_llama.yaml")
FAST = ["batch=8", "data.seq_len=64", "data.sources.code.max_docs=300",
        "data.sources.replay.max_docs=100", "eval.batches=2", "log.every=5",
        "log.progress=false", "log.plot=false", "log.tensorboard=false", "checkpoint.every=0",
        "average.kind=none", "schedule.warmup_steps=3", "schedule.cooldown_steps=5",
        "schedule.peak_lr=1e-2"]
STUDENT = ["model.config.hidden_size=32", "model.config.intermediate_size=64",
           "model.config.num_hidden_layers=1", "model.config.head_dim=8"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny Llama trained 60 steps on the bundled code corpus, exported as an HF directory."""
    d = tmp_path_factory.mktemp("teacher")
    cfg = load_train_config(LLAMA, [*FAST, "steps=60", f"out={d / 'run'}",
                                    "schedule.total_steps=60", f"export.hf_dir={d / 'hf'}",
                                    "eval.at_end=false"])
    loop.run(cfg)
    return str(d / "hf")


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    """An untrained one-layer GPT-2 with the bundled tokenizer's vocabulary (HF directory)."""
    from jaxarith.testing import make_hf_model, tiny_gpt2_config

    d = tmp_path_factory.mktemp("random_teacher")
    make_hf_model(d, tiny_gpt2_config(n_layer=1), seed=3, noise=0.5)
    return str(d)


def student_cfg(out, *extra):
    return load_train_config(LLAMA, [*FAST, *STUDENT, f"out={out}", *extra])


def heldout_kl(teacher_dir, params, cfg):
    """Mean KL(p_teacher || p_student) over the held-out code windows, in float32."""
    t = load_model(teacher_dir, progress=False)
    from jaxarith.data.assets import bundled_tokenizer

    src = load_sources(cfg.data, bundled_tokenizer())[0]
    tokens = jnp.asarray(src.eval[:16])
    model_cfg = loop.model_config(cfg)[0]
    s_logits = transformer.forward(jax.device_get(params), model_cfg, tokens)[0]
    t_logits = transformer.forward(t.params, t.config, tokens)[0]
    return float(D.forward_kl(s_logits[:, :-1], t_logits[:, :-1]))


@pytest.mark.slow
def test_distilled_student_is_closer_to_its_teacher_than_ce_alone(teacher, tmp_path):
    steps = ["steps=30", "schedule.total_steps=30", "eval.at_end=false"]
    ce = loop.run(student_cfg(tmp_path / "ce", *steps))
    dist = loop.run(student_cfg(tmp_path / "kd", *steps, f"distill.teacher={teacher}",
                                "distill.alpha=0.9", "distill.temperature=1.0"))
    kl_ce = heldout_kl(teacher, ce["state"].params, student_cfg(tmp_path / "x"))
    kl_kd = heldout_kl(teacher, dist["state"].params, student_cfg(tmp_path / "x"))
    print(f"held-out KL(teacher || student): CE only {kl_ce:.4f}, distilled {kl_kd:.4f}")
    assert kl_kd < kl_ce - 0.05, (kl_kd, kl_ce)
    with open(tmp_path / "kd" / "metrics.jsonl") as f:
        recs = [json.loads(x) for x in f]
    logged = [r for r in recs if "loss" in r]
    assert all({"distill_loss", "ce", "kl_t1"} <= set(r) for r in logged)
    assert logged[-1]["kl_t1"] < logged[0]["kl_t1"]


@pytest.mark.slow
def test_cache_equals_live_topk_and_resume_in_both_modes(teacher, tmp_path):
    k = 8
    base = ["steps=4", "schedule.total_steps=4", "checkpoint.every=2", "eval.at_end=false",
            "distill.top_k=8", "distill.top_k_tail=true", "distill.loss=jsd",
            "distill.temperature=2.0"]
    cfg0 = student_cfg(tmp_path / "c0", *base)
    from jaxarith.data.assets import bundled_tokenizer

    tok = bundled_tokenizer()
    sources = load_sources(cfg0.data, tok)
    cache = tmp_path / "cache"
    res = distill_cache.write_cache(teacher, sources, tok, str(cache), k=k, seq_len=64,
                                    batch=16, shard_windows=256)
    assert res["records"] == sum(len(s.train) for s in sources) and res["shards"] >= 2
    assert not os.path.exists(str(cache) + ".partial")

    def run(name, mode, crash_at=None):
        extra = [f"distill.teacher={teacher}"] if mode == "live" else [f"distill.cache={cache}"]
        cfg = student_cfg(tmp_path / name, *base, *extra)
        seen, crashed = {}, []

        def on_step(step, host):
            seen[step] = host
            if step == crash_at and not crashed:
                crashed.append(step)
                raise RuntimeError("killed")

        if crash_at:
            with pytest.raises(RuntimeError, match="killed"):
                loop.run(cfg, on_step=on_step)
        out = loop.run(cfg, on_step=on_step)
        return out, seen

    live, live_m = run("live", "live")
    cached, cached_m = run("cached", "cache", crash_at=3)  # resumed from the step-2 checkpoint
    assert sorted(cached["batches"]) == [3, 4]
    for step in (1, 2, 3, 4):
        for key in ("loss", "distill_loss", "ce", "kl_t1"):
            assert cached_m[step][key] == pytest.approx(live_m[step][key], rel=1e-5, abs=1e-6), \
                (step, key)
    for a, b in zip(jax.tree.leaves(jax.device_get(cached["state"].params)),
                    jax.tree.leaves(jax.device_get(live["state"].params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    resumed, _ = run("live2", "live", crash_at=3)
    assert sorted(resumed["batches"]) == [3, 4]
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed["state"].params)),
                    jax.tree.leaves(jax.device_get(live["state"].params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # the live teacher is re-loaded on resume, never read from the checkpoint
    assert set(resumed["state"].frozen) == {"distill"}
    ckpt = tmp_path / "live2" / "checkpoints" / "4" / "state"
    names = [os.path.join(d, f) for d, _, fs in os.walk(ckpt) for f in fs]
    meta = "".join(open(n, errors="ignore").read() for n in names
                   if "metadata" in os.path.basename(n).lower())
    assert "params" in meta and "'frozen', 'distill'" not in meta and "distill" not in meta

    # a cache built for other data is refused before training
    other = student_cfg(tmp_path / "other", *base, f"distill.cache={cache}",
                        "data.sources.code.max_docs=400")
    with pytest.raises(distill_cache.CacheError, match="built for other data: window"):
        loop.run(other)
    other_len = student_cfg(tmp_path / "other2", *base, f"distill.cache={cache}",
                            "data.seq_len=32")
    with pytest.raises(distill_cache.CacheError, match="seq_len=64"):
        loop.run(other_len)


def test_bad_distill_input_is_refused_before_compiling(random_teacher, tmp_path, monkeypatch):
    teacher = random_teacher
    def no_compile(*a, **k):
        raise AssertionError("compiled before refusing bad input")

    monkeypatch.setattr(loop, "compiled_step", no_compile)
    # one tokenizer, tables padded differently: accepted (distilled over the tokenizer's rows),
    # so the run goes on to compile
    bigger = ["model.config.vocab_size=1088"]
    with pytest.raises(AssertionError, match="compiled before refusing"):
        loop.run(student_cfg(tmp_path / "a", *bigger, f"distill.teacher={teacher}"))
    # another tokenizer (two tokens swapped): refused, naming the first token that differs
    import json
    import shutil

    other = tmp_path / "other_tok"
    shutil.copytree(teacher, other)
    spec = json.load(open(other / "tokenizer.json"))
    vocab = spec["model"]["vocab"]
    x, y = sorted(vocab, key=vocab.get)[300:302]
    vocab[x], vocab[y] = vocab[y], vocab[x]
    json.dump(spec, open(other / "tokenizer.json", "w"))
    with pytest.raises(ConfigError, match="differs .* at id 300"):
        loop.run(student_cfg(tmp_path / "a2", f"distill.teacher={other}"))
    with pytest.raises(ConfigError, match="unknown loss"):
        student_cfg(tmp_path / "b", f"distill.teacher={teacher}", "distill.loss=kl")
    with pytest.raises(ConfigError, match="top_k=2000 exceeds the vocabulary size 1024"):
        loop.run(student_cfg(tmp_path / "c", f"distill.teacher={teacher}",
                             "distill.top_k=2000"))
    with pytest.raises(JaxarithError, match="not a distillation cache"):
        loop.run(student_cfg(tmp_path / "d", f"distill.cache={tmp_path}"))


def test_cache_cli_records_equal_the_live_teacher_and_resume(random_teacher, tmp_path, capsys,
                                                             monkeypatch):
    from jaxarith.cli import main
    from jaxarith.data.assets import bundled_tokenizer

    k = 5
    overrides = ["data.sources.code.max_docs=60", "data.sources.replay.max_docs=40",
                 "data.seq_len=32"]
    out = tmp_path / "cache"
    args = ["distill", "cache", random_teacher, LLAMA, str(out), *overrides, "--top-k", str(k),
            "--batch", "8", "--shard-windows", "40", "--mesh", "data=2,fsdp=2,tensor=2",
            "--json"]
    # an interruption after the first shard leaves OUT absent and a resumable partial directory
    real, calls = distill_cache.encode, []

    def flaky(*a):
        calls.append(1)
        if len(calls) == 50:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(distill_cache, "encode", flaky)
    assert main(args) == 130  # Ctrl-C: one JSON error line, the finished shard kept to resume
    assert json.loads(capsys.readouterr().out)["type"] == "KeyboardInterrupt"
    assert not out.exists() and (tmp_path / "cache.partial" / "teacher-00000.array_record").exists()
    monkeypatch.setattr(distill_cache, "encode", real)
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["resumed_shards"] == 1 and res["k"] == k and res["shards"] >= 3
    assert not (tmp_path / "cache.partial").exists()
    assert main(args) == 2  # OUT exists now
    assert "already exists" in json.loads(capsys.readouterr().out)["error"]

    # every record equals the live teacher's top-k of its window (computed here on one device)
    cfg = student_cfg(tmp_path / "x", *overrides)
    tok = bundled_tokenizer()
    sources = load_sources(cfg.data, tok)
    cache = distill_cache.open_cache(str(out))
    index = distill_cache.check_cache(cache, sources, tok, 32)
    from jaxarith.sharding import make_mesh

    mesh = make_mesh("data=2,fsdp=2,tensor=2")  # the same sharded forward as the command's
    t = load_model(random_teacher, mesh=mesh, progress=False)
    windows = np.concatenate([s.train for s in sources])
    n = len(windows) // 8 * 8
    with jax.set_mesh(mesh):
        live = jax.jit(lambda p, x: D.teacher_topk(transformer.forward(p, t.config, x)[0], k,
                                                   len(tok)))(t.params, jnp.asarray(windows[:n]))
    live = jax.device_get(live)
    joiner = distill_cache.Joiner(cache, index)
    for i in range(0, n, 7):
        ex = joiner({"tokens": windows[i]})
        np.testing.assert_array_equal(ex["teacher_ids"], np.asarray(live.ids[i]))
        np.testing.assert_allclose(ex["teacher_logp"], np.asarray(live.logp[i]), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(ex["teacher_rest"], np.asarray(live.rest[i]), rtol=1e-5,
                                   atol=1e-5)
    # another tokenizer / other data are refused
    with pytest.raises(distill_cache.CacheError, match="seq_len=32, this run uses"):
        distill_cache.check_cache(cache, sources, tok, 64)
    monkeypatch.setattr(distill_cache, "tokenizer_fingerprint", lambda _: "other")
    with pytest.raises(distill_cache.CacheError, match="another tokenizer"):
        distill_cache.check_cache(cache, sources, tok, 32)
