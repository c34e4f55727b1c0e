"""Streamed ``datasets`` sources (``streaming: true``): the first ``max_docs`` documents read as
they come, never the rest; disjoint per-process shares whose union is the stream's first
``max_docs``; a training run killed and resumed equals the uninterrupted one, bit for bit.

Offline: ``path: parquet`` with ``data_files:`` streams local files exactly as a hub id does."""

import os

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxarith import data
from jaxarith.data.assets import CORPUS_CODE, bundled_tokenizer
from jaxarith.errors import CheckpointError, ConfigError, JaxarithError
from train import loop
from train.config import load_train_config

LLAMA = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_llama.yaml")
TEXTS = [f"stream document {i}: " + f"def f(x):\n    return x * {i}\n" * 3 for i in range(60)]


def _parquet(path, texts, row_group_size=8):
    pq.write_table(pa.table({"body": texts}), path, row_group_size=row_group_size)
    return str(path)


def _src(files, max_docs, **kw):
    return data.SourceConfig(name="web", kind="datasets", path="parquet", data_files=files,
                             text_field="body", streaming=True, max_docs=max_docs, **kw)


def test_stream_stops_at_max_docs_without_reading_further(tmp_path):
    first = _parquet(tmp_path / "a.parquet", TEXTS[:40])
    # a second file that is not parquet: reading it would fail, so a passing read never opened it
    broken = tmp_path / "b.parquet"
    broken.write_bytes(b"not a parquet file")
    train, evals, pos = data.stream_documents(_src([first, str(broken)], 25))
    assert train == TEXTS[:25] and evals == []
    assert pos["documents"] == 25
    with pytest.raises(pa.ArrowInvalid):  # the premise: the second file is unreadable
        data.stream_documents(_src([first, str(broken)], 50))


@pytest.mark.parametrize("eval_fraction", [0.0, 0.1])
def test_two_processes_read_disjoint_shares_whose_union_is_the_first_max_docs(tmp_path,
                                                                             eval_fraction):
    files = _parquet(tmp_path / "a.parquet", ["", *TEXTS])  # the empty document is skipped
    src = _src(files, 31)
    shares = [data.stream_documents(src, eval_fraction, p, 2) for p in range(2)]
    (t0, e0, _), (t1, e1, _) = shares
    n_eval = data.stream_eval_count(31, eval_fraction)
    assert e0 == e1 == TEXTS[:n_eval]  # every process holds the same eval documents
    assert not set(t0) & set(t1)
    assert sorted(e0 + t0 + t1) == sorted(TEXTS[:31])
    assert t0 == TEXTS[n_eval:31][0::2] and t1 == TEXTS[n_eval:31][1::2]


def test_streaming_is_the_default_for_hub_ids_with_max_docs(tmp_path):
    hub = data.SourceConfig(name="w", kind="datasets", path="HuggingFaceFW/fineweb-edu",
                            max_docs=10)
    assert hub.stream
    assert not data.SourceConfig(name="w", kind="datasets", path="HuggingFaceFW/fineweb-edu").stream
    assert not data.SourceConfig(name="w", kind="datasets", path=str(tmp_path), max_docs=10).stream
    assert not data.SourceConfig(name="w", kind="datasets", path="parquet", max_docs=10).stream


@pytest.mark.parametrize("fields, match", [
    ({"streaming": True}, "data.sources.web.streaming is on but max_docs is 0"),
    ({"kind": "text", "path": "a.txt", "subset": "x"}, "data.sources.web.subset applies to"),
    ({"data_files": 3}, "data.sources.web.data_files=3"),
    ({"data_files": {"train": []}}, "data.sources.web.data_files"),
])
def test_bad_stream_keys_are_named(fields, match):
    kw = {"kind": "datasets", "path": "parquet", **fields}
    with pytest.raises(ConfigError, match=match):
        data.SourceConfig(name="web", **kw)


def test_stream_errors_name_the_source(tmp_path):
    files = _parquet(tmp_path / "a.parquet", TEXTS)
    with pytest.raises(JaxarithError, match="data source 'web'.*no column 'text'"):
        data.stream_documents(data.SourceConfig(name="web", kind="datasets", path="parquet",
                                                data_files=files, streaming=True, max_docs=5))


def test_streamed_source_equals_the_same_documents_read_whole(tmp_path):
    """A stream's windows are those of the same documents from a parquet source."""
    files = _parquet(tmp_path / "a.parquet", TEXTS)
    cfg = data.DataConfig(seq_len=32, eval_fraction=0.0, sources=(_src(files, 40),))
    tok = bundled_tokenizer()
    got = data.load_source(cfg.sources[0], tok, cfg)
    whole = data.SourceConfig(name="web", kind="parquet", path=files, text_field="body",
                              max_docs=40)
    np.testing.assert_array_equal(got.train, data.load_source(whole, tok, cfg).train)
    assert got.process_local and got.position["documents"] == 40


def test_kill_and_resume_with_a_streamed_source_equals_uninterrupted(tmp_path):
    with open(CORPUS_CODE, encoding="utf-8") as f:
        docs = [d.strip("\n") for d in f.read().split("\n\n") if d.strip()][:700]
    files = _parquet(tmp_path / "code.parquet", docs, row_group_size=64)
    base = ["batch=8", "data.seq_len=64", "eval.batches=1", "log.every=1", "log.progress=false",
            "schedule.total_steps=40", "schedule.warmup_steps=5", "schedule.cooldown_steps=10",
            "steps=4", "checkpoint.every=2", "eval.at_end=false", "log.plot=false",
            "log.tensorboard=false", "data.sources.replay.max_docs=300",
            "data.sources.code.kind=datasets", "data.sources.code.path=parquet",
            f"data.sources.code.data_files=[{files}]", "data.sources.code.text_field=body",
            "data.sources.code.streaming=true", "data.sources.code.max_docs=600"]
    cfg_path = LLAMA
    full = loop.run(load_train_config(cfg_path, [*base, f"out={tmp_path / 'full'}"]))
    cfg = load_train_config(cfg_path, [*base, f"out={tmp_path / 'cut'}"])

    def crash(step, _):
        if step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        loop.run(cfg, on_step=crash)
    resumed = loop.run(cfg)
    assert sorted(resumed["batches"]) == [3, 4]
    assert all(resumed["batches"][s] == full["batches"][s] for s in (3, 4))
    a, b = jax.device_get(resumed["state"].params), jax.device_get(full["state"].params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)

    # the stream position is in the checkpoint: another max_docs reads other documents
    more = load_train_config(cfg_path, [*base, f"out={tmp_path / 'cut'}", "steps=6",
                                  "data.sources.code.max_docs=500"])
    with pytest.raises(ConfigError, match="data.sources.code.max_docs: 600 -> 500"):
        loop.run(more)  # the resume check of the saved config names the key first
    allow = ("data.sources.code.max_docs",)  # allowed there, the stream itself still refuses
    with pytest.raises(CheckpointError, match="data source 'code' gives other documents"):
        loop.run(more, allow_config_change=allow,
                 on_step=lambda *_: pytest.fail("refused only after training"))
    with pytest.raises(CheckpointError, match="max_docs"):
        loop.run(more, allow_config_change=allow)
