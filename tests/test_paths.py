"""Outputs on a non-local fsspec filesystem (``memory://``, standing in for ``gs://``): a training
run's ``out`` (marker, config.json, metrics.jsonl, TensorBoard events, loss.png, summary.json;
resumed and re-run from there) and the object-store safe-output rules (a foreign location is
refused, an upload goes through a temporary prefix and its marker is written last)."""

import json
import os

import fsspec
import pytest

from jaxarith.io import paths
from jaxarith.io.atomic import MARKER, OutputExistsError, UnsafeDestinationError
from train import loop
from train.config import load_train_config

LLAMA = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_llama.yaml")
FAST = ["batch=8", "data.seq_len=64", "data.sources.code.max_docs=600",
        "data.sources.replay.max_docs=300", "eval.batches=1", "log.every=2",
        "log.progress=false", "schedule.total_steps=40", "schedule.warmup_steps=5",
        "schedule.cooldown_steps=10", "eval.at_end=false"]


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    yield fs
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")


def test_training_run_out_on_memory_fs(memfs, tmp_path):
    out = "memory://bucket/runs/tiny"
    # orbax writes gs:// itself but has no memory:// filesystem: checkpoints stay local here
    over = [*FAST, f"out={out}", f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every=2",
            "export.hf_dir=memory://bucket/exports/tiny"]
    cfg = load_train_config(LLAMA, [*over, "steps=4"])

    def crash(step, _):
        if step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        loop.run(cfg, on_step=crash)
    assert memfs.exists("/bucket/runs/tiny/" + MARKER)  # claimed before any work
    res = loop.run(cfg)  # resumes from step 2, continuing the metrics in the bucket
    assert res["status"] == "done" and sorted(res["batches"]) == [3, 4]
    names = set(paths.listdir(out))
    assert {MARKER, "config.json", "metrics.jsonl", "summary.json", "loss.png",
            "tensorboard"} <= names
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["2", "4"]
    recs = [json.loads(line) for line in paths.read_text(out + "/metrics.jsonl").splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [2, 4]
    assert json.loads(paths.read_text(out + "/config.json"))["out"] == out
    assert json.loads(paths.read_text(out + "/summary.json"))["step"] == 4
    assert paths.listdir(out + "/tensorboard")
    assert memfs.cat_file("/bucket/runs/tiny/loss.png")[:4] == b"\x89PNG"

    # the export: uploaded through a temporary prefix (gone), marker last; it loads back
    assert res["export_hf"] == "memory://bucket/exports/tiny"
    assert memfs.ls("/bucket/exports", detail=False) == ["/bucket/exports/tiny"]
    exported = set(paths.listdir("memory://bucket/exports/tiny"))
    assert {MARKER, "config.json", "model.safetensors", "tokenizer.json"} <= exported
    memfs.get("/bucket/exports/tiny", str(tmp_path / "hf"), recursive=True)
    from jaxarith.io.convert.hf import load_hf_params

    _, params = load_hf_params(str(tmp_path / "hf"))
    import jax
    import numpy as np

    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(res["state"].params)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)

    again = loop.run(cfg)  # finished: reported from the bucket's summary, nothing written
    assert again["already_done"] and again["step"] == 4
    with pytest.raises(OutputExistsError, match="already exists"):  # a new run may not
        loop.run(load_train_config(LLAMA, [*over, "out=memory://bucket/runs/second", "steps=1",
                                     f"checkpoint.dir={tmp_path / 'ckpt2'}"]))
    assert not paths.exists("memory://bucket/runs/second/config.json")  # refused before work


def test_a_foreign_location_is_refused(memfs):
    memfs.pipe_file("/bucket/theirs/data.bin", b"x")
    cfg = load_train_config(LLAMA, [*FAST, "out=memory://bucket/theirs", "steps=1"])
    with pytest.raises(UnsafeDestinationError, match="not written by jaxarith"):
        loop.run(cfg)
    assert memfs.ls("/bucket/theirs", detail=False) == ["/bucket/theirs/data.bin"]


def test_upload_dir_uses_a_temporary_prefix_and_writes_the_marker_last(memfs, tmp_path,
                                                                       monkeypatch):
    local = tmp_path / "model"
    (local / "sub").mkdir(parents=True)
    (local / "a.json").write_text("{}")
    (local / "sub" / "b.bin").write_bytes(b"123")
    writes = []
    real_put, real_write = memfs.put_file, paths.write_text
    monkeypatch.setattr(type(memfs), "put_file",
                        lambda self, lpath, rpath, **kw: (writes.append(("put", rpath)),
                                                          real_put(lpath, rpath, **kw))[1])
    monkeypatch.setattr(paths, "write_text",
                        lambda path, text: (writes.append(("write", path)),
                                            real_write(path, text))[1])
    paths.upload_dir(str(local), "memory://bucket/export/model")
    assert [w[0] for w in writes] == ["put", "put", "write"]
    assert all("/.model.tmp-" in w[1] for w in writes[:2])  # uploaded under a temporary prefix
    assert writes[-1][1] == "memory://bucket/export/model/" + MARKER
    assert sorted(memfs.find("/bucket/export")) == [
        "/bucket/export/model/" + MARKER, "/bucket/export/model/a.json",
        "/bucket/export/model/sub/b.bin"]  # no temporary left
    assert memfs.cat_file("/bucket/export/model/sub/b.bin") == b"123"
    with pytest.raises(OutputExistsError, match="pass overwrite"):
        paths.upload_dir(str(local), "memory://bucket/export/model")
    (local / "a.json").write_text('{"new": 1}')
    paths.upload_dir(str(local), "memory://bucket/export/model", overwrite=True)  # ours
    assert memfs.cat_file("/bucket/export/model/a.json") == b'{"new": 1}'
    assert memfs.exists("/bucket/export/model/" + MARKER)
    memfs.pipe_file("/bucket/export/other/x", b"1")
    with pytest.raises(UnsafeDestinationError, match="not written by jaxarith"):
        paths.upload_dir(str(local), "memory://bucket/export/other")
