"""grain data pipeline: reading sources, packing with separators, weighted mixing with replay,
per-process shares and exact resume from the iterator state."""

import dataclasses
import json

import numpy as np
import pytest

from jaxarith import data
from jaxarith.data.assets import EOS_ID, bundled_tokenizer
from jaxarith.errors import ConfigError, JaxarithError


def _fake_sources(weights, n=(50, 30), seq_len=4):
    # every window of source i holds the value 1000 * (i + 1) + row, so rows are identifiable
    out = []
    for i, (w, rows) in enumerate(zip(weights, n, strict=True)):
        win = (1000 * (i + 1) + np.arange(rows))[:, None].repeat(seq_len, 1).astype(np.int32)
        out.append(data.SourceData(f"s{i}", w, win, win[:2]))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_tokenizer()


def test_pack_puts_eos_between_documents(tokenizer):
    docs = ["def f(x):\n    return x", "class A:\n    pass", "print(1)"]
    ids = data.tokenize(docs, tokenizer)
    want = []
    for d in docs:
        want += tokenizer(d, add_special_tokens=False)["input_ids"] + [EOS_ID]
    np.testing.assert_array_equal(ids, want)
    assert (ids == EOS_ID).sum() == len(docs)
    win = data.pack(ids, 5)
    assert win.shape == (len(ids) // 5, 5)
    np.testing.assert_array_equal(win.reshape(-1), ids[: win.size])


@pytest.mark.parametrize("weights", [(0.95, 0.05), (0.7, 0.3)])
def test_mixing_shares_match_weights(weights):
    ds = data.mixed_dataset(_fake_sources(weights), seed=3)
    it = data.batch_iterator(ds, 16)
    counts = np.zeros(2)
    for _ in range(100):
        b = next(it)
        np.testing.assert_array_equal(b["source"], b["tokens"][:, 0] // 1000 - 1)
        counts += np.bincount(b["source"], minlength=2) * b["tokens"].shape[1]
    share = counts / counts.sum()
    np.testing.assert_allclose(share, weights, atol=0.01)


@pytest.mark.parametrize("weights,only", [((1.0, 0.0), 0), ((0.0, 1.0), 1)])
def test_replay_fraction_zero_and_one_give_one_source(weights, only):
    it = data.batch_iterator(data.mixed_dataset(_fake_sources(weights)), 8)
    for _ in range(20):
        b = next(it)
        assert set(b["source"].tolist()) == {only}
        assert set((b["tokens"][:, 0] // 1000 - 1).tolist()) == {only}


def test_each_epoch_is_a_new_permutation():
    src = _fake_sources((1.0,), n=(12,))
    it = data.batch_iterator(data.mixed_dataset(src, seed=0), 12)
    e1, e2 = next(it)["tokens"][:, 0], next(it)["tokens"][:, 0]
    assert sorted(e1) == sorted(e2) == list(range(1000, 1012))
    assert not np.array_equal(e1, e2)


def test_processes_share_the_global_batch():
    ds = data.mixed_dataset(_fake_sources((0.8, 0.2)), seed=1)
    whole = data.batch_iterator(ds, 8)
    parts = [data.batch_iterator(ds, 8, process_index=p, process_count=2) for p in range(2)]
    for _ in range(4):
        g = next(whole)["tokens"]
        local = [next(p)["tokens"] for p in parts]
        assert all(x.shape == (4, 4) for x in local)
        np.testing.assert_array_equal(np.sort(np.concatenate(local)[:, 0]), np.sort(g[:, 0]))
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        data.batch_iterator(ds, 8, process_index=0, process_count=3)


def test_iterator_state_resumes_exactly():
    ds = data.mixed_dataset(_fake_sources((0.9, 0.1)), seed=7)
    ref = data.batch_iterator(ds, 4)
    want = [next(ref)["tokens"] for _ in range(12)]
    it = data.batch_iterator(ds, 4)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON round trip
    resumed = data.batch_iterator(ds, 4, state=state)
    for k in range(5, 12):
        np.testing.assert_array_equal(next(resumed)["tokens"], want[k])


def test_sources_text_jsonl_parquet_datasets(tmp_path, tokenizer):
    texts = [f"document number {i} " * 5 for i in range(20)]
    (tmp_path / "a.txt").write_text("\n\n".join(texts))
    with open(tmp_path / "a.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"body": t}) + "\n")
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts}),
                          "test": datasets.Dataset.from_dict({"body": ["x"]})}).save_to_disk(
        str(tmp_path / "dd"))  # a DatasetDict: its split is read
    cfgs = [data.SourceConfig(name="t", path=str(tmp_path / "a.txt")),
            data.SourceConfig(name="j", kind="jsonl", path=str(tmp_path / "*.jsonl"),
                              text_field="body"),
            data.SourceConfig(name="p", kind="parquet", path=str(tmp_path / "a.parquet"),
                              text_field="body"),
            data.SourceConfig(name="d", kind="datasets", path=str(tmp_path / "ds"),
                              text_field="body"),
            data.SourceConfig(name="dd", kind="datasets", path=str(tmp_path / "dd"),
                              text_field="body")]
    for c in cfgs:
        assert data.read_documents(c) == texts, c.kind
    with pytest.raises(JaxarithError, match="data source 'd'.*no column 'text'"):
        data.read_documents(dataclasses.replace(cfgs[3], text_field="text"))
    dc = data.DataConfig(sources=tuple(cfgs[:1]), seq_len=16, eval_fraction=0.1)
    sd = data.load_source(cfgs[0], tokenizer, dc)
    n_train = len(data.tokenize(texts[:18], tokenizer)) // 16
    assert sd.train.shape == (n_train, 16) and len(sd.eval) > 0


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(JaxarithError, match="no such file"):
        data.read_documents(data.SourceConfig(name="x", path=str(tmp_path / "missing.txt")))
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(JaxarithError, match=r"c.jsonl:3: invalid JSON"):
        data.read_documents(data.SourceConfig(name="c", kind="jsonl",
                                              path=str(tmp_path / "c.jsonl")))
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(JaxarithError, match=r"b.jsonl:2: no key 'text'"):
        data.read_documents(data.SourceConfig(name="x", kind="jsonl",
                                              path=str(tmp_path / "b.jsonl")))
    with pytest.raises(ConfigError, match="data.sources.x.kind"):
        data.SourceConfig(name="x", kind="csv", path="a")
