"""Packed documents (``data.packing``): segment ids and positions of the pipeline, a packed row
scored like each document alone in transformers, the train step on a mesh against a
per-document reference, and ``stream`` batches as before."""

from __future__ import annotations

import dataclasses

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxarith import data, testing
from jaxarith.data.assets import bundled_tokenizer
from jaxarith.distill import cache as distill_cache
from jaxarith.errors import ConfigError
from jaxarith.io.convert.hf import load_hf_params
from jaxarith.models import token_logprobs, transformer
from jaxarith.models.config import config_from_hf
from jaxarith.models.transformer import forward, next_token_loss
from jaxarith.schedules import ScheduleConfig
from jaxarith.sharding import make_mesh
from train.config import OptimizerConfig
from train.evaluation import make_eval
from train.step import build_step, compile_step, init_state, make_optimizer, next_token_loss_fn

EOS = 2


# ----------------------------------------------------------------------------- pipeline


def test_document_segments_by_hand():
    # a window that starts inside a document, holds two whole ones (the EOS is the last token
    # of its document) and ends inside a fourth; then two EOS in a row (an empty document)
    tokens = np.array([[7, 8, 2, 5, 6, 2, 9, 2, 3, 4],
                       [2, 2, 5, 2, 6, 7, 8, 9, 3, 4]])
    seg, pos = data.document_segments(tokens, EOS)
    np.testing.assert_array_equal(seg, [[1, 1, 1, 2, 2, 2, 3, 3, 4, 4],
                                        [1, 2, 3, 3, 4, 4, 4, 4, 4, 4]])
    np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 2, 0, 1, 0, 1],
                                        [0, 0, 0, 1, 0, 1, 2, 3, 4, 5]])
    assert seg.dtype == pos.dtype == np.int32
    one_seg, arange = data.document_segments(tokens[0], None)  # chat: one document a window
    np.testing.assert_array_equal(one_seg, np.ones(10))
    np.testing.assert_array_equal(arange, np.arange(10))


def _cfg(packing, seq_len=64):
    return data.DataConfig(seq_len=seq_len, eval_fraction=0.1, packing=packing,
                           sources=(data.SourceConfig(name="code", path="bundled:code"),))


def _old_batches(source, seed, batch, n):
    """The pipeline before ``packing`` existed, written out: shuffled windows, tokens, ones as
    weights, the source id."""
    ones = np.ones(source.train.shape[1], np.float32)
    ds = grain.MapDataset.source(np.arange(len(source.train))).seed(seed).shuffle()
    ds = ds.repeat(None).map(lambda i: {"tokens": np.asarray(source.train[i], np.int32),
                                        "weights": ones, "source": np.int32(0)})
    it = iter(ds.batch(batch, drop_remainder=True).to_iter_dataset())
    return [next(it) for _ in range(n)]


def test_stream_batches_are_the_old_ones_and_documents_add_two_fields():
    tok = bundled_tokenizer()
    stream = data.load_sources(_cfg("stream"), tok)
    docs = data.load_sources(_cfg("documents"), tok)
    assert not stream[0].documents and docs[0].documents and docs[0].eos_id == tok.eos_token_id
    old = _old_batches(stream[0], 3, 8, 3)
    it_s = data.batch_iterator(data.mixed_dataset(stream, 3), 8)
    it_d = data.batch_iterator(data.mixed_dataset(docs, 3), 8)
    for ref in old:
        s, d = next(it_s), next(it_d)
        assert sorted(s) == ["source", "tokens", "weights"]
        for k in ref:
            assert s[k].dtype == ref[k].dtype and s[k].tobytes() == ref[k].tobytes()
            assert d[k].tobytes() == ref[k].tobytes()
        seg, pos = data.document_segments(ref["tokens"], tok.eos_token_id)
        np.testing.assert_array_equal(d["segment_ids"], seg)
        np.testing.assert_array_equal(d["positions"], pos)
        assert (d["segment_ids"] > 1).any()  # windows do hold several documents
    # the held-out windows: tokens only for stream, with the two fields for documents
    ev_s, ev_d = data.eval_windows(stream[0], 4), data.eval_windows(docs[0], 4)
    assert isinstance(ev_s, np.ndarray)
    np.testing.assert_array_equal(ev_d["tokens"], ev_s)
    np.testing.assert_array_equal(ev_d["positions"],
                                  data.document_segments(ev_s, tok.eos_token_id)[1])


def test_packing_is_validated():
    with pytest.raises(ConfigError, match="data.packing"):
        _cfg("bogus")
    assert _cfg("stream").packing is data.Packing.STREAM
    assert dataclasses.replace(_cfg("documents")).packing is data.Packing.DOCUMENTS


def test_chat_windows_are_one_segment_each():
    cfg = data.DataConfig(seq_len=128, packing="documents", eval_fraction=0.0, sources=(
        data.SourceConfig(name="chat", path="bundled:instruct", kind="chat"),))
    src = data.load_sources(cfg, bundled_tokenizer())[0]
    ex = data.mixed_dataset([src])[0]
    np.testing.assert_array_equal(ex["segment_ids"], np.ones(128))
    np.testing.assert_array_equal(ex["positions"], np.arange(128))


# ----------------------------------------------------------------------------- the model


def _docs(rng, lengths):
    """Documents of random tokens (never EOS), each ending with EOS."""
    return [np.r_[rng.integers(3, testing.TINY_VOCAB, n - 1), EOS] for n in lengths]


def _hf_logprobs(hf, doc):
    """log p(doc[t + 1] | doc[:t + 1]) by transformers, the document alone."""
    logits = testing.hf_logits(hf, doc[None])[0]
    lp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return np.take_along_axis(lp[:-1], doc[1:, None], -1)[:, 0]


@pytest.mark.parametrize("attention,t", [("xla", 300), ("splash-interpret", 128)])
@pytest.mark.parametrize("name,hf_config", [
    ("llama_gqa", testing.tiny_llama_config(max_position_embeddings=512)),
    ("gpt2", testing.tiny_gpt2_config(n_positions=512)),
    # sliding windows (4 keys) and soft-capping: the window counts inside each document
    ("gemma2", testing.tiny_gemma2_config(max_position_embeddings=512)),
])
def test_packed_row_equals_each_document_alone_in_transformers(tmp_path, name, hf_config,
                                                               attention, t):
    hf = testing.make_hf_model(tmp_path / name, hf_config, seed=3)
    cfg, params = load_hf_params(str(tmp_path / name), progress=False)
    # three documents; with T = 300 the XLA path's 128-query blocks cut through them
    lengths = (t * 3 // 8, t // 3, t - t * 3 // 8 - t // 3)
    docs = _docs(np.random.default_rng(1), lengths)
    row = np.concatenate(docs)[None]
    seg, pos = data.document_segments(row, EOS)
    assert seg.max() == 3
    logits = forward(params, cfg, jnp.asarray(row), segment_ids=jnp.asarray(seg),
                     positions=jnp.asarray(pos), attention=attention).logits
    got = np.asarray(token_logprobs(logits[:, :-1], jnp.asarray(row[:, 1:])))[0]
    start = 0
    for doc in docs:  # within each document: as transformers scores it alone
        n = len(doc)
        np.testing.assert_allclose(got[start:start + n - 1], _hf_logprobs(hf, doc), atol=1e-4)
        start += n
    # the loss has every target (the boundary ones too) and sums what forward gives
    nll, count = next_token_loss(params, cfg, jnp.asarray(row), segment_ids=jnp.asarray(seg),
                                 positions=jnp.asarray(pos), attention=attention, fused=True)
    assert float(count) == t - 1
    np.testing.assert_allclose(float(nll), -got.sum(), rtol=1e-5)


def test_segment_ids_refused_with_a_cache():
    mcfg = config_from_hf(testing.tiny_llama_config().to_dict())
    params = transformer.init_params(mcfg, 0)
    cache = transformer.init_cache(mcfg, 1, 8)
    with pytest.raises(ConfigError, match="segment_ids"):
        forward(params, mcfg, jnp.ones((1, 4), jnp.int32), cache=cache,
                segment_ids=jnp.ones((1, 4), jnp.int32))


# ----------------------------------------------------------------------------- the train step


def _reference_loss(params, cfg, rows_docs, seq):
    """Mean NLL of packed rows computed document by document (each document alone, as its own
    right-padded row; log-softmax in float64): every token of a document predicted from its own
    prefix, and the first token of the next document predicted from the whole previous one
    (its EOS)."""
    flat = [d for docs in rows_docs for d in docs]
    rows = np.zeros((len(flat), seq), np.int32)
    mask = np.zeros((len(flat), seq), np.int32)
    for r, d in enumerate(flat):
        rows[r, :len(d)], mask[r, :len(d)] = d, 1
    logits = np.asarray(forward(params, cfg, jnp.asarray(rows),
                                attention_mask=jnp.asarray(mask)).logits, np.float64)
    top = logits.max(-1, keepdims=True)
    lp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    total, count, r = 0.0, 0, 0
    for docs in rows_docs:
        for i, doc in enumerate(docs):
            targets = list(doc[1:]) + ([docs[i + 1][0]] if i + 1 < len(docs) else [])
            total -= sum(lp[r, j, tgt] for j, tgt in enumerate(targets))
            count += len(targets)
            r += 1
    return total / count


@pytest.mark.parametrize("microbatches", [1, 2])
def test_train_step_on_a_mesh_equals_a_per_document_reference(llama_dir, microbatches):
    cfg, params = load_hf_params(llama_dir[0], progress=False)
    batch, seq = 8, 48
    rng = np.random.default_rng(5)
    rows_docs = []
    for _ in range(batch):
        cut = sorted(rng.choice(np.arange(4, seq - 4), 2, replace=False))
        rows_docs.append(_docs(rng, (cut[0], cut[1] - cut[0], seq - cut[1])))
    tokens = np.stack([np.concatenate(d) for d in rows_docs]).astype(np.int32)
    seg, pos = data.document_segments(tokens, EOS)
    sched = ScheduleConfig(kind="constant", peak_lr=1e-3, total_steps=10).build()
    tx = make_optimizer(OptimizerConfig(), sched)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    fields = {"tokens": ((), "int32"), "segment_ids": ((), "int32"),
              "positions": ((), "int32")}
    fns = build_step(cfg, mesh, tx=tx, schedule=sched, batch=batch, seq_len=seq,
                     microbatches=microbatches, loss_fn=next_token_loss_fn(cfg),
                     batch_fields=fields)
    step, _ = compile_step(fns, mesh)
    ref = _reference_loss(params, cfg, rows_docs, seq)  # before the step donates the params
    stream_nll, n = next_token_loss(params, cfg, jnp.asarray(tokens))
    state = init_state(fns, jax.device_put(params, transformer.param_shardings(cfg, mesh)), mesh)
    m = microbatches
    feed = {k: jax.device_put(v.reshape(m, batch // m, seq), fns.batch_sharding[k])
            for k, v in (("tokens", tokens), ("segment_ids", seg), ("positions", pos))}
    _, metrics = step(state, feed)
    np.testing.assert_allclose(float(metrics["loss"]), ref, rtol=1e-5)
    assert float(metrics["tokens"]) == batch * (seq - 1)
    # and it is not the streamed windows' loss (documents do not see each other)
    assert abs(float(stream_nll / n) - ref) > 1e-4


def test_held_out_eval_scores_packed_documents(llama_dir):
    cfg, params = load_hf_params(llama_dir[0], progress=False)
    rng = np.random.default_rng(7)
    tokens = np.stack([np.concatenate(_docs(rng, (10, 20, 18))) for _ in range(3)])
    seg, pos = data.document_segments(tokens, EOS)
    mesh = make_mesh("fsdp=1", jax.devices()[:1])
    evaluate = make_eval(cfg, mesh, 2, 48, "float32")  # 3 rows: the second batch is padded
    got = evaluate(params, {"tokens": tokens, "segment_ids": seg, "positions": pos})
    nll, n = next_token_loss(params, cfg, jnp.asarray(tokens), segment_ids=jnp.asarray(seg),
                             positions=jnp.asarray(pos))
    np.testing.assert_allclose(got, float(nll / n), rtol=1e-6)
    assert abs(evaluate(params, tokens) - got) > 1e-4  # streamed windows score otherwise


def test_a_stream_cache_is_refused_by_a_documents_run():
    tok = bundled_tokenizer()
    src = data.SourceData("code", 1.0, np.zeros((1, 8), np.int32), np.zeros((0, 8), np.int32),
                          documents=True, eos_id=EOS)
    manifest = {"tokenizer": distill_cache.tokenizer_fingerprint(tok), "seq_len": 8,
                "sources": []}  # no "packing": written before it existed, i.e. stream
    cache = distill_cache.Cache("/nonexistent", manifest, np.zeros((0, 3), np.uint64))
    with pytest.raises(distill_cache.CacheError, match="packing"):
        distill_cache.check_cache(cache, [src], tok, 8)


def test_the_loop_declares_the_segment_fields_only_for_documents():
    from train.loop import batch_fields

    tok = bundled_tokenizer()
    for packing, extra in (("documents", {"segment_ids", "positions"}), ("stream", set())):
        ex = data.mixed_dataset(data.load_sources(_cfg(packing), tok))[0]
        fields = batch_fields(ex, 64)
        assert set(fields) == {"tokens", "weights"} | extra
        assert all(fields[k] == ((), "int32") for k in extra)


def test_a_run_saved_before_packing_resumes_as_stream():
    from train.resume import check_config_unchanged

    saved = {"data": {"seq_len": 8}}  # a config.json written before data.packing existed
    check_config_unchanged(saved, {"data": {"seq_len": 8, "packing": "stream"}}, (), "/run")
    with pytest.raises(ConfigError, match="data.packing: 'stream' -> 'documents'"):
        check_config_unchanged(saved, {"data": {"seq_len": 8, "packing": "documents"}}, (),
                               "/run")
