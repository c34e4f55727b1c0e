"""W&B logging (``log.wandb``): with ``WANDB_MODE=offline`` the run's files under ``OUT/wandb``
are read back: the run's project, name and tags, the run config, and every metrics.jsonl record
at its step; a resumed run continues the same W&B run."""

import glob
import json
import os
import struct

import pytest

from train import loop
from train.config import load_train_config

wandb = pytest.importorskip("wandb")

LLAMA = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_llama.yaml")
FAST = ["batch=8", "data.seq_len=64", "data.sources.code.max_docs=600",
        "data.sources.replay.max_docs=300", "eval.batches=1", "log.every=2",
        "log.progress=false", "checkpoint.every=0", "schedule.total_steps=40",
        "schedule.warmup_steps=5", "schedule.cooldown_steps=10", "log.plot=false",
        "log.tensorboard=false", "eval.every=2"]


def wandb_records(path: str) -> list:
    """The records of a ``.wandb`` transaction log (LevelDB log format: 32 KiB blocks of
    chunks with a 7-byte header; the file starts with a 7-byte ``:W&B`` header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        buf = f.read()
    assert buf[:4] == b":W&B", buf[:7]
    pos, block, part, out = 7, 32768, b"", []
    while pos + 7 <= len(buf):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        if kind == 0:
            break
        part += buf[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            rec = pb.Record()
            rec.ParseFromString(part)
            out.append(rec)
            part = b""
    return out


def _history(records) -> dict[int, dict]:
    steps: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in r.history.item}
            steps.setdefault(int(items["_step"]), {}).update(
                {k: v for k, v in items.items() if not k.startswith("_")})
    return steps


def test_wandb_offline_run_holds_config_and_every_metric(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    over = [*FAST, f"out={out}", "log.wandb.project=jaxarith-test", "log.wandb.name=tiny",
            "log.wandb.tags=[cpt, tiny]"]
    cfg = load_train_config(LLAMA, [*over, "steps=4", "checkpoint.every=2"])

    def crash(step, _):
        if step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        loop.run(cfg, on_step=crash)
    assert loop.run(cfg)["status"] == "done"  # resumed from step 2

    runs = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    run_id = (out / "wandb_run_id").read_text().strip()
    assert len(runs) == 2 and all(r.endswith(f"run-{run_id}.wandb") for r in runs)
    records = [r for path in sorted(runs) for r in wandb_records(path)]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name, list(run.tags)) == ("jaxarith-test", "tiny",
                                                               ["cpt", "tiny"])
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["steps"] == 4 and config["log"]["wandb"]["project"] == "jaxarith-test"
    assert config["data"]["sources"]["code"]["max_docs"] == 600

    with open(out / "metrics.jsonl") as f:
        jsonl = [json.loads(line) for line in f]
    want: dict[int, dict] = {}
    for rec in jsonl:
        want.setdefault(rec["step"], {}).update({k: v for k, v in rec.items() if k != "step"})
    got = _history(records)
    assert sorted(want) == [2, 4] and set(got) >= set(want)
    for step, metrics in want.items():
        assert set(metrics) >= {"loss", "lr", "eval/code/loss"}
        for k, v in metrics.items():
            assert got[step][k] == pytest.approx(v, rel=1e-12), (step, k)


def test_wandb_keys_are_validated():
    from jaxarith.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown config key log.wandb.projekt"):
        load_train_config(LLAMA, ["log.wandb.projekt=x"])
    with pytest.raises(ConfigError, match="missing config key log.wandb.project"):
        load_train_config(LLAMA, ["log.wandb.name=x"])
    with pytest.raises(ConfigError, match="log.wandb.tags"):
        load_train_config(LLAMA, ["log.wandb.project=p", "log.wandb.tags=[1, 2]"])
