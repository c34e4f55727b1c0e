"""The training program end to end on CPU: loss falls on bundled text (tiny Llama and GPT-2),
kill-and-resume equals an uninterrupted run, preemption saves, non-finite losses stop the run,
outputs (metrics.jsonl, TensorBoard, loss.png) and the HF export with a re-added delta."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from jaxarith import testing
from train import hooks, loop
from train.config import load_train_config

ROOT = os.path.join(os.path.dirname(__file__), "..")
LLAMA = os.path.join(ROOT, "configs", "tiny_llama.yaml")
GPT2 = os.path.join(ROOT, "configs", "tiny_gpt2.yaml")
# Small enough for CI: fewer documents, short sequences; the schedule's length is pinned so every
# run below shares one compiled step (the loop caches it in-process).
FAST = ["batch=8", "data.seq_len=64", "data.sources.code.max_docs=600",
        "data.sources.replay.max_docs=300", "eval.batches=1", "log.every=5",
        "log.progress=false", "checkpoint.every=0", "schedule.total_steps=40",
        "schedule.peak_lr=1e-2", "schedule.warmup_steps=5", "schedule.cooldown_steps=10"]


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tiny_llama_loss_falls_via_cli(tmp_path, capsys):
    from train.__main__ import main

    out = tmp_path / "run"
    assert main([LLAMA, "steps=40", f"out={out}", *FAST, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    recs = _records(out)
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in train)
    start = np.log(1024)  # a random init predicts ~uniformly over the 1024-token vocabulary
    assert summary["loss"] < start - 1.25, (start, summary["loss"])
    ev = summary["eval"]
    assert set(ev) == {"eval/code/loss", "eval/replay/loss", "eval_avg/code/loss",
                       "eval_avg/replay/loss"}
    assert ev["eval/code/loss"] < start - 1.0
    assert os.path.getsize(out / "loss.png") > 1000
    assert any(f.startswith("events") for f in os.listdir(out / "tensorboard"))
    assert summary["status"] == "done" and summary["step"] == 40


def _params(state):
    return jax.device_get(state.params)


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    base = [*FAST, "steps=4", "checkpoint.every=2", "eval.at_end=false", "log.plot=false",
            "log.tensorboard=false"]
    full = loop.run(load_train_config(LLAMA, [*base, f"out={tmp_path / 'full'}"]))

    cfg = load_train_config(LLAMA, [*base, f"out={tmp_path / 'cut'}"])

    def crash(step, _):
        if step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        loop.run(cfg, on_step=crash)
    resumed = loop.run(cfg)  # the same command again
    assert sorted(resumed["batches"]) == [3, 4]  # resumed from the checkpoint at step 2
    for step in (3, 4):
        assert resumed["batches"][step] == full["batches"][step]
    a, b = _params(resumed["state"]), _params(full["state"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    ema_a = jax.device_get(resumed["state"].average.params)
    ema_b = jax.device_get(full["state"].average.params)
    for x, y in zip(jax.tree.leaves(ema_a), jax.tree.leaves(ema_b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    lines = [r["step"] for r in _records(tmp_path / "cut") if "loss" in r]
    assert lines == sorted(set(lines))  # the resumed metrics file reads as one run

    # SIGTERM (a pod preemption) saves a checkpoint at the current step and exits cleanly
    pre = load_train_config(LLAMA, [*base, f"out={tmp_path / 'pre'}", "checkpoint.every=0"])

    def preempt(step, _):
        if step == 3:
            signal.raise_signal(signal.SIGTERM)

    res = loop.run(pre, on_step=preempt)
    assert res["status"] == "preempted" and res["step"] == 3
    assert sorted(os.listdir(tmp_path / "pre" / "checkpoints")) == ["3"]
    done = loop.run(pre)
    assert sorted(done["batches"]) == [4] and done["batches"][4] == full["batches"][4]


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_good_checkpoint(tmp_path,
                                                                          monkeypatch):
    base = [*FAST, "steps=4", "checkpoint.every=2", "eval.at_end=false", "log.plot=false",
            "log.tensorboard=false", f"out={tmp_path}"]
    real = loop.compiled_step

    def poisoned(*args):
        fns, step, info = real(*args)

        def wrapped(state, batch):
            new, m = step(state, batch)
            if int(new.step) == 3:
                m = dict(m, loss=np.float32(np.nan), finite=np.bool_(False))
            return new, m

        return fns, wrapped, info

    monkeypatch.setattr(loop, "compiled_step", poisoned)
    with pytest.raises(loop.NonFiniteLossError, match=r"at step 3.*Last good checkpoint: 2"):
        loop.run(load_train_config(LLAMA, base))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


@pytest.mark.slow  # moved out of `make test` (its ~10 min budget); CI runs it (make test-slow)
def test_tiny_gpt2_trains_and_exports_with_delta(tmp_path):
    from jaxarith.io.convert.export import save_hf
    from jaxarith.io.convert.hf import load_hf_params
    from train.step import scratch_params

    scratch = load_train_config(GPT2, [f"out={tmp_path}"])
    model_cfg, _ = loop.model_config(scratch)
    tuned, base = scratch_params(model_cfg, 1), scratch_params(model_cfg, 2)
    save_hf(model_cfg, tuned, tmp_path / "tuned", progress=False)
    save_hf(model_cfg, base, tmp_path / "base", progress=False)
    # continued pre-training: start from the HF checkpoint `base` (a fresh random init here)
    cfg = load_train_config(GPT2, [*FAST, "steps=80", "schedule.total_steps=80", "log.every=10",
                             f"model.ref={tmp_path / 'base'}", "model.arch=", "model.config={}",
                             f"out={tmp_path / 'run'}", f"export.hf_dir={tmp_path / 'hf'}",
                             f"export.delta_tuned={tmp_path / 'tuned'}",
                             f"export.delta_base={tmp_path / 'base'}"])
    # GPT-2 sits on a unigram plateau (~5.8 nats) for its first ~60 steps here: run 80
    res = loop.run(cfg)
    assert res["loss"] < np.log(1024) - 1.25
    assert res["eval"]["eval/code/loss"] < np.log(1024) - 1.0
    trained = jax.device_get(res["state"].params)
    _, got = load_hf_params(str(tmp_path / "hf"))
    want = jax.tree.map(lambda t, a, b: t + (np.asarray(a) - np.asarray(b)), trained,
                        tuned, base)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(x), y, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_tiny_configs_full_run_loss_falls_well_below_start(tmp_path, config):
    """The configs as shipped (300 steps of 16 x 128 tokens, a few minutes on 2 cores); the
    HF export loads in transformers and gives the logits of our forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxarith.io.convert.hf import load_hf_params
    from jaxarith.models import transformer

    res = loop.run(load_train_config(config, [f"out={tmp_path / 'run'}", "log.progress=false",
                                        f"export.hf_dir={tmp_path / 'hf'}"]))
    start = np.log(1024)
    assert res["loss"] < start - 2.0, res["loss"]
    assert res["eval"]["eval/code/loss"] < start - 2.0
    assert res["eval"]["eval/replay/loss"] < start - 1.5
    model_cfg, params = load_hf_params(str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    tokens = np.arange(1, 65, dtype=np.int32)[None]
    ours = transformer.jit_forward(params, model_cfg, tokens, np.ones_like(tokens))
    np.testing.assert_allclose(testing.hf_logits(model, tokens), np.asarray(ours), atol=1e-4,
                               rtol=1e-4)


def test_time_based_checkpoints_with_a_fake_clock(tmp_path, monkeypatch):
    """checkpoint.every_minutes saves when that much time passed since the last such save,
    beside (not instead of) the step-based saves; here one fake minute passes per step."""
    ticks = iter(range(0, 10_000, 60))
    monkeypatch.setattr(hooks, "checkpoint_clock", lambda: next(ticks))
    cfg = load_train_config(LLAMA, [*FAST, "steps=7", f"out={tmp_path / 'run'}",
                                    "checkpoint.keep=10", "checkpoint.every_minutes=2.5",
                                    "checkpoint.every=5", "eval.at_end=false", "log.plot=false",
                                    "log.tensorboard=false"])
    assert loop.run(cfg)["status"] == "done"
    # minutes 3 and 6 (>= 2.5 since the start, then since the save at 3), step 5, the end
    assert sorted(int(s) for s in os.listdir(tmp_path / "run" / "checkpoints")) == [3, 5, 6, 7]


@pytest.mark.parametrize("override, match", [
    ("checkpoint.every_minutes=-1", "checkpoint.every_minutes=-1.0 must be >= 0"),
    ("checkpoint.every_minutes=soon", "checkpoint.every_minutes='soon': expected float"),
    ("checkpoint.keep=0", "checkpoint.keep=0 must be at least 1"),
])
def test_bad_checkpoint_keys_are_named(override, match):
    from jaxarith.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_train_config(LLAMA, [override])
