"""Pre-tokenised data (`jaxarith data tokenize`, `kind: tokenized`): the windows, batches, mixture
and resume state equal those of the text sources they were made from (the in-memory text
pipeline of jaxarith.data.pipeline is the reference); mismatches and damage are clear errors; the
command is atomic and prints one JSON object."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxarith import data
from jaxarith.data import tokenized
from jaxarith.data.assets import CORPUS_CODE, CORPUS_DOCS, TOKENIZER_JSON, bundled_tokenizer
from train import loop
from train.config import load_train_config

ROOT = os.path.join(os.path.dirname(__file__), "..")
LLAMA = os.path.join(ROOT, "configs", "tiny_llama.yaml")
T = 32
DOCS = {"code": ("bundled:code", 600), "replay": ("bundled:docs", 300)}


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_tokenizer()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Both bundled corpora tokenised (the first max_docs documents), small shards so a source
    spans several files."""
    d = tmp_path_factory.mktemp("tok")
    out = {}
    for name, (path, max_docs) in DOCS.items():
        out[name] = str(d / name)
        tokenized.tokenize_to_dir([path], out[name], tokenizer_ref="bundled", seq_len=T,
                                  opts=tokenized.ReadOptions(max_docs=max_docs), workers=2,
                                  batch_docs=64, shard_windows=500)
    return out


def _cfg(kinds, paths, weights=(0.9, 0.1), **kw):
    srcs = []
    for (name, (path, max_docs)), kind, w in zip(DOCS.items(), kinds, weights, strict=True):
        srcs.append(data.SourceConfig(
            name=name, kind=kind, weight=w, path=paths[name] if kind == "tokenized" else path,
            max_docs=0 if kind == "tokenized" else max_docs))
    return data.DataConfig(sources=srcs, seq_len=T, **kw)


def _batches(cfg, tokenizer, n, batch=8, state=None, **kw):
    it = data.batch_iterator(data.mixed_dataset(data.load_sources(cfg, tokenizer), cfg.seed),
                             batch, state=state, **kw)
    return [next(it) for _ in range(n)], it


def test_windows_equal_the_text_source(shards, tokenizer):
    cfg = _cfg(("text", "text"), shards)
    man = tokenized.read_manifest(shards["code"])
    assert len(man["splits"]["train"]["shards"]) > 1  # the source spans several shards
    for src in cfg.sources:
        ref = data.load_source(src, tokenizer, cfg)
        got = data.load_source(data.SourceConfig(name=src.name, kind="tokenized",
                                                 path=shards[src.name]), tokenizer, cfg)
        assert got.train.shape == ref.train.shape and len(got.eval) == len(ref.eval) > 0
        np.testing.assert_array_equal(np.asarray(got.train), ref.train)
        np.testing.assert_array_equal(np.asarray(got.eval), ref.eval)
        np.testing.assert_array_equal(got.train[-1], ref.train[-1])
        assert got.train[3].dtype == np.int32


@pytest.mark.parametrize("kinds", [("tokenized", "tokenized"), ("tokenized", "text")])
def test_mixture_batches_and_process_shares_equal_text(shards, tokenizer, kinds):
    ref, _ = _batches(_cfg(("text", "text"), shards, seed=3), tokenizer, 6)
    got, _ = _batches(_cfg(kinds, shards, seed=3), tokenizer, 6)
    assert {1} <= {int(s) for b in ref for s in b["source"]}  # the replay source is drawn
    for a, b in zip(ref, got, strict=True):
        for k in ("tokens", "weights", "source"):
            np.testing.assert_array_equal(a[k], b[k])
    # process 1 of 2 gets rows 1, 3, ... of each global batch, from tokenised data too
    half, _ = _batches(_cfg(kinds, shards, seed=3), tokenizer, 6, process_index=1,
                       process_count=2)
    for a, b in zip(ref, half, strict=True):
        np.testing.assert_array_equal(a["tokens"][1::2], b["tokens"])


def test_resume_from_iterator_state_equals_uninterrupted(shards, tokenizer):
    full, _ = _batches(_cfg(("text", "text"), shards), tokenizer, 7)
    _, it = _batches(_cfg(("tokenized", "tokenized"), shards), tokenizer, 3)
    state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
    rest, _ = _batches(_cfg(("tokenized", "tokenized"), shards), tokenizer, 4, state=state)
    for a, b in zip(full[3:], rest, strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


def _train_args(shards, tokenized_sources: bool):
    args = ["batch=8", f"data.seq_len={T}", "steps=4", "eval.batches=1", "log.every=1",
            "log.progress=false", "log.plot=false", "log.tensorboard=false", "eval.every=0",
            "eval.at_end=true", "schedule.total_steps=40", "checkpoint.every=2"]
    for name, (_, max_docs) in DOCS.items():
        args += [f"data.sources.{name}.kind=tokenized", f"data.sources.{name}.path="
                 f"{shards[name]}"] if tokenized_sources else \
            [f"data.sources.{name}.max_docs={max_docs}"]
    return args


@pytest.mark.slow  # moved out of `make test` (its ~10 min budget); CI runs it (make test-slow)
def test_training_from_tokenized_equals_text_and_resumes(shards, tmp_path):
    text = loop.run(load_train_config(LLAMA, [*_train_args(shards, False),
                                              f"out={tmp_path / 't'}"]))
    cfg = load_train_config(LLAMA, [*_train_args(shards, True), f"out={tmp_path / 'k'}"])

    def crash(step, _):
        if step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        loop.run(cfg, on_step=crash)
    resumed = loop.run(cfg)  # from the checkpoint at step 2
    assert sorted(resumed["batches"]) == [3, 4]
    for step in (3, 4):
        assert resumed["batches"][step] == text["batches"][step]
    assert resumed["loss"] == pytest.approx(text["loss"], rel=1e-6)
    assert resumed["eval"] == pytest.approx(text["eval"], rel=1e-6)


def test_mismatches_are_clear_errors(shards, tokenizer):
    src = data.SourceConfig(name="code", kind="tokenized", path=shards["code"])
    with pytest.raises(tokenized.TokenizedDataError, match=r"'code'.*seq_len=32 but "
                       r"data.seq_len=64"):
        data.load_source(src, tokenizer, data.DataConfig(sources=[src], seq_len=64))
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(tokenizer_file=TOKENIZER_JSON, pad_token="<pad>",
                                    bos_token="<s>", eos_token="<pad>")  # another EOS id
    with pytest.raises(tokenized.TokenizedDataError, match="another tokenizer"):
        data.load_source(src, other, data.DataConfig(sources=[src], seq_len=T))
    with pytest.raises(tokenized.TokenizedDataError, match="add_bos=False but data.add_bos"):
        data.load_source(src, tokenizer, data.DataConfig(sources=[src], seq_len=T,
                                                         add_bos=True))
    with pytest.raises(tokenized.TokenizedDataError, match="eval_fraction=0.05 but"):
        data.load_source(src, tokenizer, data.DataConfig(sources=[src], seq_len=T,
                                                         eval_fraction=0.1))


def test_missing_manifest_and_corrupt_shards(shards, tokenizer, tmp_path):
    import shutil

    cfg = lambda p: data.DataConfig(sources=[data.SourceConfig(  # noqa: E731
        name="code", kind="tokenized", path=str(p))], seq_len=T)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(tokenized.TokenizedDataError, match="no manifest.json in .*empty.*"
                       "jaxarith data tokenize"):
        data.load_sources(cfg(empty), tokenizer)
    bad = tmp_path / "bad"
    shutil.copytree(shards["code"], bad)
    shard = bad / "train-00000.array_record"
    raw = bytearray(shard.read_bytes())
    for i in range(2000, len(raw) - 2000, 97):  # same size, damaged content
        raw[i] ^= 0xFF
    shard.write_bytes(bytes(raw))
    (src,) = data.load_sources(cfg(bad), tokenizer)
    with pytest.raises(tokenized.TokenizedDataError, match="cannot read window .*corrupt"):
        for i in range(len(src.train)):
            src.train[i]
    shard.write_bytes(bytes(raw[:1000]))  # truncated: refused before training starts
    with pytest.raises(tokenized.TokenizedDataError, match="train-00000.array_record is corrupt"):
        data.load_sources(cfg(bad), tokenizer)
    os.remove(shard)
    with pytest.raises(tokenized.TokenizedDataError, match="train-00000.array_record is missing"):
        data.load_sources(cfg(bad), tokenizer)


def test_jsonl_parquet_and_datasets_inputs_equal_their_sources(tokenizer, tmp_path,
                                                               monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = open(CORPUS_DOCS).read().split("\n\n")[:120]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "d.parquet", row_group_size=50)
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "builder").mkdir()  # a local data directory, read by load_dataset
    (tmp_path / "builder" / "train.jsonl").write_text(jl.read_text())
    for kind, path in (("jsonl", jl), ("parquet", tmp_path / "d.parquet"),
                       ("datasets", tmp_path / "ds"), ("datasets", tmp_path / "builder")):
        out = tmp_path / f"out_{path.name}"
        tokenized.tokenize_to_dir([str(path)], str(out), tokenizer_ref="bundled", seq_len=T,
                                  opts=tokenized.ReadOptions(text_field="body"), add_bos=True,
                                  eval_fraction=0.1)
        cfg = data.DataConfig(sources=[data.SourceConfig(name="s", kind=kind, path=str(path),
                                                         text_field="body")],
                              seq_len=T, add_bos=True, eval_fraction=0.1)
        ref = data.load_source(cfg.sources[0], tokenizer, cfg)
        got = data.load_source(data.SourceConfig(name="s", kind="tokenized", path=str(out)),
                               tokenizer, cfg)
        np.testing.assert_array_equal(np.asarray(got.train), ref.train, err_msg=kind)
        np.testing.assert_array_equal(np.asarray(got.eval), ref.eval, err_msg=kind)
        assert (ref.train == 1).any()  # BOS really is in the windows


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "jaxarith", "data", "tokenize", *args],
                          capture_output=True, text=True, env=env, timeout=120, **kw)


def test_cli_json_and_manifest(tmp_path):
    out = tmp_path / "o"
    r = _cli(CORPUS_CODE, CORPUS_DOCS, str(out), "--tokenizer", "bundled", "--seq-len", "16",
             "--max-docs", "200", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)  # exactly one JSON object
    man = tokenized.read_manifest(str(out))
    assert res["train_windows"] == man["splits"]["train"]["windows"] > 0
    assert res["documents"] == 200 and res["seq_len"] == 16
    assert res["tokenizer_sha256"] == tokenized.tokenizer_hash(bundled_tokenizer())
    assert [i["bytes"] for i in man["inputs"]] == [os.path.getsize(CORPUS_CODE),
                                                   os.path.getsize(CORPUS_DOCS)]
    r = _cli(CORPUS_CODE, str(out), "--tokenizer", "bundled", "--seq-len", "16", "--json")
    assert r.returncode == 2
    assert "already exists" in json.loads(r.stdout)["error"]


def _leftovers(parent, name):
    return [e for e in os.listdir(parent) if e.startswith(f".{name}.")]


def test_failing_and_killed_runs_leave_no_output(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text("".join(json.dumps({"text": f"doc {i} " * 50}) + "\n" for i in range(300)))
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "fine"}\n{"nope": 1}\n')
    out = tmp_path / "out"
    with pytest.raises(Exception, match="b.jsonl:2: no key 'text'"):
        tokenized.tokenize_to_dir([str(good), str(bad)], str(out), tokenizer_ref="bundled",
                                  seq_len=T)
    assert not out.exists() and not _leftovers(tmp_path, "out")

    # killed mid-write (SIGKILL: no clean-up code runs): OUT never appears, and the next run
    # removes the dead process's temporary directory
    big = tmp_path / "big.txt"
    big.write_text(open(CORPUS_CODE).read() * 10)
    p = subprocess.Popen([sys.executable, "-m", "jaxarith", "data", "tokenize", str(big),
                          str(out), "--tokenizer", "bundled", "--seq-len", "16",
                          "--workers", "1"], env={**os.environ, "PYTHONPATH": ROOT},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not _leftovers(tmp_path, "out") and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "finished before it could be killed"
    p.kill()
    p.communicate(timeout=60)
    assert not out.exists() and len(_leftovers(tmp_path, "out")) == 1
    r = _cli(str(good), str(out), "--tokenizer", "bundled", "--seq-len", "16")
    assert r.returncode == 0 and "removed" in r.stderr, r.stderr
    assert out.exists() and not _leftovers(tmp_path, "out")
