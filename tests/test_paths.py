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


# ------------------------------------------- command outputs: convert, merge, delta, average


def _download(memfs, url: str, local) -> str:
    """The objects under ``url`` copied to a local directory (to read them back)."""
    root = url.split("://", 1)[1]
    for obj in memfs.find("/" + root):
        rel = obj[len("/" + root) + 1:]
        os.makedirs(os.path.dirname(os.path.join(local, rel)) or local, exist_ok=True)
        with open(os.path.join(local, rel), "wb") as f:
            f.write(memfs.cat_file(obj))
    return str(local)


def _equal_dirs(a, b) -> None:
    import numpy as np

    from jaxarith.io.convert.hf import HFCheckpoint

    ca, cb = HFCheckpoint(a), HFCheckpoint(b)
    assert sorted(ca.keys()) == sorted(cb.keys())
    for k in ca.keys():
        np.testing.assert_array_equal(ca.get(k), cb.get(k), err_msg=k)


@pytest.mark.parametrize("command", ["convert", "merge", "delta", "average"])
def test_command_outputs_on_memory_fs_equal_local_ones(memfs, tmp_path, llama_dir,
                                                      llama_tied_dir, command, capsys):
    """Each command's output at a memory:// URL is, read back, the same files as its local
    output; its marker is there; the JSON names the URL; a second run without --overwrite is
    refused before any work."""
    from jaxarith.cli import main

    other = tmp_path / "other"
    from jaxarith import testing

    testing.make_hf_model(other, testing.tiny_llama_config(rope_scaling=testing.LLAMA3_ROPE),
                          seed=5)
    yaml = tmp_path / "m.yaml"
    yaml.write_text(f"merge_method: task_arithmetic\nbase_model: {llama_dir[0]}\nmodels:\n"
                    f"  - model: {other}\n    parameters: {{weight: 0.5}}\n")
    argv = {"convert": ["convert", llama_tied_dir[0], "{out}", "--to", "hf",
                        "--dtype", "bfloat16"],
            "merge": ["merge", str(yaml), "{out}"],
            "delta": ["delta", "extract", str(other), llama_dir[0], "{out}"],
            "average": ["average", llama_dir[0], str(other), "{out}"]}[command]
    url = f"memory://bucket/{command}/out"
    for out in (str(tmp_path / "local"), url):
        assert main([a.format(out=out) for a in argv] + ["--json"]) == 0, capsys.readouterr()
        res = json.loads(capsys.readouterr().out)
        assert res.get("out", res.get("dst")) == out
    assert memfs.exists(f"/bucket/{command}/out/{MARKER}")
    assert not [p for p in memfs.find("/bucket") if ".tmp-" in p]
    back = _download(memfs, url, tmp_path / "back")
    _equal_dirs(str(tmp_path / "local"), back)
    assert main([a.format(out=url) for a in argv] + ["--json"]) == 2
    assert "already exists" in json.loads(capsys.readouterr().out)["error"]


def test_a_failed_merge_to_a_url_uploads_nothing(memfs, tmp_path, llama_dir, capsys,
                                                 monkeypatch):
    from jaxarith.arith import stream
    from jaxarith.cli import main

    yaml = tmp_path / "m.yaml"
    yaml.write_text(f"merge_method: linear\nmodels:\n  - model: {llama_dir[0]}\n"
                    f"  - model: {llama_dir[0]}\n")
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return real(*a, **k)

    real = stream._compute
    monkeypatch.setattr(stream, "_compute", boom)
    with pytest.raises(RuntimeError, match="disk full"):  # an unexpected error: raised
        main(["merge", str(yaml), "memory://bucket/failed", "--json"])
    assert len(calls) > 3
    assert not memfs.exists("/bucket/failed") and not memfs.find("/bucket")


def test_tokenized_data_on_memory_fs(memfs, tmp_path, capsys):
    from jaxarith.cli import main

    argv = ["data", "tokenize", "bundled:docs", "{out}", "--tokenizer", "bundled",
            "--seq-len", "32", "--max-docs", "40"]
    for out in (str(tmp_path / "local"), "memory://bucket/tok"):
        assert main([a.format(out=out) for a in argv] + ["--json"]) == 0
        assert json.loads(capsys.readouterr().out)["out"] == out
    back = _download(memfs, "memory://bucket/tok", tmp_path / "back")
    local_files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "local")
                         for d, _, fs in os.walk(tmp_path / "local") for f in fs)
    assert local_files == sorted(os.path.relpath(os.path.join(d, f), back)
                                 for d, _, fs in os.walk(back) for f in fs)
    for rel in local_files:
        if rel == MARKER:
            continue
        a, b = open(tmp_path / "local" / rel, "rb").read(), open(os.path.join(back, rel),
                                                                   "rb").read()
        assert a == b or rel == "manifest.json", rel
