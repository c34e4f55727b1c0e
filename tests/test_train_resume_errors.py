"""How runs end and restart: a finished run is reported and left untouched (no eval row, no
compile); resuming with another model shape names what changed in one short line; a pod config on
one machine is one line (JSON under --json); orbax's harmless per-save warning is silenced."""

import json
import logging
import os

import pytest

from jaxarith.errors import CheckpointError
from train import loop
from train.config import load_train_config

ROOT = os.path.join(os.path.dirname(__file__), "..")
LLAMA = os.path.join(ROOT, "configs", "tiny_llama.yaml")
POD = os.path.join(ROOT, "configs", "llama3_2_1b_cpt_pod.yaml")
FAST = ["batch=8", "data.seq_len=64", "data.sources.code.max_docs=600",
        "data.sources.replay.max_docs=300", "eval.batches=1", "log.every=5",
        "log.progress=false", "checkpoint.every=0", "schedule.total_steps=40",
        "schedule.peak_lr=1e-2", "schedule.warmup_steps=5", "schedule.cooldown_steps=10",
        "log.tensorboard=false"]


def test_finished_run_is_reported_and_untouched_then_shape_change_is_named(tmp_path, capsys,
                                                                          monkeypatch):
    from train.__main__ import main

    out = tmp_path / "run"
    args = [LLAMA, "steps=2", f"out={out}", *FAST, "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    files = {n: (out / n).read_bytes() for n in ("metrics.jsonl", "summary.json", "loss.png")}
    assert first["status"] == "done" and first["loss"] is not None

    def no_compile(*a):
        raise AssertionError("a finished run must not compile")

    monkeypatch.setattr(loop, "compiled_step", no_compile)
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["already_done"] and again["loss"] == first["loss"] and again["step"] == 2
    assert {n: (out / n).read_bytes() for n in files} == files  # not one byte changed
    # asking a finished run for an export it has not written: done from the last checkpoint
    assert main([*args, "--export-hf", str(tmp_path / "hf")]) == 0
    exported = json.loads(capsys.readouterr().out)["export_hf"]
    assert exported == str(tmp_path / "hf") and (tmp_path / "hf" / "config.json").exists()
    assert json.loads((out / "summary.json").read_text())["export_hf"] == exported
    assert (out / "metrics.jsonl").read_bytes() == files["metrics.jsonl"]
    monkeypatch.undo()

    # more steps with another hidden size: refused before orbax, naming the keys and tensors
    with pytest.raises(CheckpointError) as e:
        loop.run(load_train_config(LLAMA, [*FAST, "steps=4", f"out={out}",
                                     "model.config.hidden_size=32"]))
    msg = str(e.value)
    assert "hidden_size: 64 -> 32" in msg and "embed (1024, 64) -> (1024, 32)" in msg
    assert len(msg) < 600 and "\n" not in msg
    # a changed state layout (EMA -> SWA) is named too
    with pytest.raises(CheckpointError, match=r"average.kind: 'ema' -> 'swa'"):
        loop.run(load_train_config(LLAMA, [*FAST, "steps=4", f"out={out}", "average.kind=swa"]))
    # fewer steps than the checkpoints hold: a clear error, not a silent no-op
    with pytest.raises(Exception, match="already has a checkpoint at step 2"):
        loop.run(load_train_config(LLAMA, [*FAST, "steps=1", f"out={out}"]))


def test_pod_config_on_one_machine_is_one_line(capsys):
    from train.__main__ import main

    assert main([POD, "--json"]) == 2
    captured = capsys.readouterr()
    err = json.loads(captured.out)  # exactly one JSON object
    assert err["type"] == "ConfigError"
    assert "distributed: true but no multi-host cluster" in err["error"]
    assert main([POD]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "distributed=false" in lines[0]


def test_orbax_ocdbt_merge_warning_is_silenced(caplog):
    import train.checkpoint  # noqa: F401  (installs the filter)

    with caplog.at_level(logging.WARNING):
        logging.getLogger("absl").warning("Skipping merge of OCDBT checkpoints: No per-process "
                                          "OCDBT checkpoint subdirs found in /x")
        logging.getLogger("absl").warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_mesh_strict_refuses_an_undivided_dimension_before_work(tmp_path):
    from jaxarith.errors import ShardingError

    # 4 attention heads over tensor=8: replicated by default, an error naming it when strict
    cfg = load_train_config(LLAMA, [*FAST, "steps=2", f"out={tmp_path}", "mesh=tensor=8",
                              "mesh_strict=true"])
    with pytest.raises(ShardingError, match="layers/attn"):
        loop.run(cfg, extensions=[])
    assert not os.path.exists(tmp_path / "checkpoints")


def _signal_at(monkeypatch, sig, step):
    """Make the CLI's run send ``sig`` to its own process after ``step``."""
    import signal as signal_lib

    from train.extensions import Extension, Hook

    def kill(ctx):
        if ctx.step == step:
            signal_lib.raise_signal(sig)

    ext = Extension(name="killer", hooks=(Hook(name="killer", every=1, fn=kill),))
    monkeypatch.setattr(loop, "discover", lambda cfg: [ext])


def test_sigterm_exit_code_and_ctrl_c_error(tmp_path, capsys, monkeypatch):
    import signal as signal_lib

    from train import EXIT_INTERRUPTED, EXIT_PREEMPTED
    from train.__main__ import main

    _signal_at(monkeypatch, signal_lib.SIGTERM, 1)
    out = tmp_path / "run"
    assert main([LLAMA, "steps=2", f"out={out}", *FAST, "--json"]) == EXIT_PREEMPTED == 75
    res = json.loads(capsys.readouterr().out)
    assert res["status"] == "preempted" and res["step"] == 1

    _signal_at(monkeypatch, signal_lib.SIGINT, 2)
    out = tmp_path / "ctrl_c"
    assert main([LLAMA, "steps=3", f"out={out}", *FAST, "--json"]) == EXIT_INTERRUPTED == 130
    err = json.loads(capsys.readouterr().out)
    assert err["type"] == "KeyboardInterrupt" and err["step"] == 2
    assert "checkpoint is saved" in err["error"]
    assert sorted(os.listdir(out / "checkpoints")) == ["2"]

    # SIGTERM outside the training steps (here: while loading data): preempted at once, 75
    def preempt(*a, **k):
        signal_lib.raise_signal(signal_lib.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(loop.data_lib, "load_sources", preempt)
    assert main([LLAMA, "steps=3", f"out={tmp_path / 'ctrl_c'}", *FAST, "--json"]) == 75
    res = json.loads(capsys.readouterr().out)
    assert res["status"] == "preempted" and res["step"] == 2  # its last checkpoint

    # Ctrl-C outside the training steps (here: while loading data): one line, exit 130
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.data_lib, "load_sources", interrupt)
    assert main([LLAMA, "steps=3", f"out={tmp_path / 'x'}", *FAST]) == EXIT_INTERRUPTED
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["jaxarith train: interrupted (Ctrl-C)"]
