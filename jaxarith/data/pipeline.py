"""Training data with grain: read documents, tokenise, pack, shuffle, mix sources by weight.

Pipeline per source::

    documents (text / jsonl / parquet / a ``datasets`` dataset / chat jsonl)
      -> held-out split (the last ``eval_fraction`` of the documents)
      -> tokenise with the model's tokenizer, EOS after every document (optional BOS before)
      -> concatenate and cut into fixed windows [N, seq_len] (packing; EOS separates documents)
      -> grain.MapDataset.source(windows).seed(seed + i).shuffle().repeat()   (reshuffled per epoch)

then ``grain.MapDataset.mix(sources, weights)`` interleaves them deterministically in exact
proportion to their weights (e.g. 95% new domain, 5% replay of the original data); a weight of 0
drops a source. Element ``k`` of the mixture is a pure function of ``k``, so:

* each process takes the strided slice ``mixed[p::P]``: its local batch ``i`` is rows
  ``p, p+P, ...`` of global batch ``i``, and the processes together cover the global batch exactly;
* the iterator's state is one integer (``get_state()`` -> ``{"next_index": k}``), saved with the
  checkpoint, so a resumed run sees exactly the batches an uninterrupted run would have.

A streamed ``datasets`` source (``streaming: true``, the default for a hub id with ``max_docs``)
reads only the stream's first ``max_docs`` documents, and of them each process tokenises only its
own share (:func:`stream_documents`). Its windows then differ between processes, so with several
processes every process mixes its own sources (:func:`local_shares`: the other sources' windows
split ``p::P``) and takes every element (``batch_iterator(..., local=True)``); the state is still
one integer.

The token windows of each source are held in host memory (int32), except for a ``kind: tokenized``
source (``jaxarith data tokenize``, :mod:`jaxarith.data.tokenized`), whose windows stay on disk
and are read by index: the same windows as the text source, so the same batches.

Loss weights. Every example is ``{"tokens": [T] int32, "weights": [T] float32, "source": id}``;
``weights`` is the loss weight of each token as a prediction target. Text sources have all ones,
so text and chat sources mix in one batch. A ``kind: chat`` source is a jsonl of
``{"messages": [{"role", "content"}, ...]}`` rendered by :mod:`jaxarith.data.chat` (the tokenizer's
chat template, or the built-in template for the bundled tokenizer) with weight 1 on assistant
tokens only. Chat sources are **not packed**: each conversation gets its own window, right-padded
(weight 0), so conversations never share a window and no attention or loss crosses between them
(text sources are packed, see below).

Packed documents (``data.packing``). With ``documents`` (the default) every example also carries
``segment_ids`` [T] int32 and ``positions`` [T] int32 (:func:`document_segments`): a document is
its tokens *and the EOS that ends it*, so a new segment starts at the token after each EOS, and
positions restart at 0 there. The model then lets a token attend only to earlier tokens of its own
segment, and each document is scored as if it were alone (up to the window cut: a document
continued from the previous window starts at position 0 of this one). The target predicted at
an EOS, the next document's first token, is kept, as Levanter (``LmExample.causal``: its loss
mask drops only the last position) and MaxText (targets and ``targets_segmentation`` shifted
together, only padding masked) keep it: it is the model's guess of how a document starts, made
from a query that sees only the document just ended. Chat windows hold one conversation each: one
segment, positions 0..T-1. With ``stream`` the examples have neither field and the window is one
sequence (documents attend to the earlier documents of the window), as before ``packing``
existed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from jaxarith.data import chat, tokenized
from jaxarith.data.sources import (
    DataConfig,
    Packing,
    SourceConfig,
    SourceData,
    SourceKind,
    read_chats,
    read_documents,
    stream_documents,
)
from jaxarith.errors import ConfigError, JaxarithError

# ----------------------------------------------------------------------------- tokenising


def tokenize(docs: Sequence[str], tokenizer, *, add_bos: bool = False) -> np.ndarray:
    """Concatenated token ids of ``docs`` with EOS after each (and BOS before, if asked)."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None:
        raise JaxarithError("the tokenizer has no EOS token to separate documents")
    if add_bos and bos is None:
        raise JaxarithError("data.add_bos is set but the tokenizer has no BOS token")
    ids = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    parts = []
    for seq in ids:
        parts.append(([bos] if add_bos else []) + list(seq) + [eos])
    return np.fromiter((t for p in parts for t in p), dtype=np.int32)


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a token stream into [N, seq_len] windows (the remainder is dropped)."""
    n = len(tokens) // seq_len
    return np.asarray(tokens[: n * seq_len], np.int32).reshape(n, seq_len)


def document_segments(tokens: np.ndarray, eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and positions [..., T] (int32) of packed windows ``tokens`` [..., T].

    A document ends with its EOS: the segment id goes up by one at the token *after* each EOS
    (ids count from 1 in each window; 0 is left for padding, as the kernels' segment ids use
    it), and the position restarts at 0 there. ``eos_id`` None: one segment, positions 0..T-1.

    Example: ``tokens = [5, 6, 2, 7, 2, 8]`` with EOS 2 gives segment ids ``[1, 1, 1, 2, 2, 3]``
    and positions ``[0, 1, 2, 0, 1, 0]``.
    """
    tokens = np.asarray(tokens)
    t = tokens.shape[-1]
    idx = np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape)
    if eos_id is None:
        return np.ones(tokens.shape, np.int32), np.array(idx)
    ends = tokens == eos_id
    starts = np.zeros(tokens.shape, bool)  # a document starts after each EOS
    starts[..., 1:] = ends[..., :-1]
    segment_ids = (1 + np.cumsum(starts, axis=-1)).astype(np.int32)
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=-1)
    return segment_ids, (idx - first).astype(np.int32)


def split_documents(docs: Sequence, eval_fraction: float) -> tuple[list, list]:
    """(train, held-out): the last ``eval_fraction`` of the documents (at least one, at most all
    but one, when the fraction is positive)."""
    n_eval = int(round(len(docs) * eval_fraction))
    if eval_fraction > 0:
        n_eval = min(max(n_eval, 1), len(docs) - 1)
    return list(docs[: len(docs) - n_eval]), list(docs[len(docs) - n_eval:])


def load_chat_source(src: SourceConfig, tokenizer, cfg: DataConfig) -> SourceData:
    """Render a chat source one conversation per window, with assistant-only loss weights."""
    train_c, eval_c = split_documents(read_chats(src), cfg.eval_fraction)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id

    def windows(convs):
        return chat.pad_windows([chat.render(c, tokenizer, add_bos=cfg.add_bos) for c in convs],
                                cfg.seq_len, pad)

    train, train_w = windows(train_c)
    evals, eval_w = windows(eval_c)
    return SourceData(src.name, src.weight, train, evals, train_w, eval_w,
                      documents=cfg.packing is Packing.DOCUMENTS)


def load_source(src: SourceConfig, tokenizer, cfg: DataConfig, *, process_index: int = 0,
                process_count: int = 1) -> SourceData:
    """Read, split, tokenise and pack one source (a streamed source: this process's share of
    its documents, :func:`stream_documents`)."""
    if src.kind is SourceKind.CHAT:
        return load_chat_source(src, tokenizer, cfg)
    documents = cfg.packing is Packing.DOCUMENTS
    if src.kind is SourceKind.TOKENIZED:
        return dataclasses.replace(tokenized.load_source(src, tokenizer, cfg),
                                   documents=documents, eos_id=tokenizer.eos_token_id)
    position = None
    if src.stream:
        train_docs, eval_docs, position = stream_documents(
            src, cfg.eval_fraction, process_index, process_count)
    else:
        train_docs, eval_docs = split_documents(read_documents(src), cfg.eval_fraction)
    train = pack(tokenize(train_docs, tokenizer, add_bos=cfg.add_bos), cfg.seq_len)
    evals = pack(tokenize(eval_docs, tokenizer, add_bos=cfg.add_bos), cfg.seq_len) \
        if eval_docs else np.zeros((0, cfg.seq_len), np.int32)
    if len(train) == 0:
        raise JaxarithError(f"data source {src.name!r}: fewer than seq_len={cfg.seq_len} "
                            "tokens of training text")
    return SourceData(src.name, src.weight, train, evals, process_local=position is not None,
                      position=position, documents=documents, eos_id=tokenizer.eos_token_id)


def load_sources(cfg: DataConfig, tokenizer, *, process_index: int = 0,
                 process_count: int = 1) -> list[SourceData]:
    """Every source of ``cfg``; streamed sources read this process's share."""
    return [load_source(s, tokenizer, cfg, process_index=process_index,
                        process_count=process_count) for s in cfg.sources]


def stream_positions(sources: Sequence[SourceData]) -> dict:
    """``{source name: position}`` of the streamed sources (empty without any)."""
    return {s.name: s.position for s in sources if s.position is not None}


class _Strided:
    """Rows ``p, p + P, ...`` of a random-access sequence of windows."""

    def __init__(self, rows, start: int, step: int):
        self.rows, self.start, self.step = rows, start, step

    def __len__(self) -> int:
        return max(0, (len(self.rows) - self.start + self.step - 1) // self.step)

    def __getitem__(self, i):
        return self.rows[self.start + int(i) * self.step]


def local_shares(sources: Sequence[SourceData], process_index: int, process_count: int
                 ) -> list[SourceData]:
    """Sources for a per-process pipeline (some source is process-local, i.e. streamed, and
    there are several processes): every other source keeps its windows ``p::P``, so no window
    is trained on by two processes; each process then mixes its own sources and takes every
    element (``batch_iterator(..., local=True)``)."""
    out = []
    for s in sources:
        if s.process_local or process_count == 1:
            out.append(s)
            continue
        w = None if s.train_weights is None else \
            _Strided(s.train_weights, process_index, process_count)
        train = _Strided(s.train, process_index, process_count)
        if len(train) == 0:
            raise JaxarithError(f"data source {s.name!r}: {len(s.train)} training windows "
                                f"cannot be shared by {process_count} processes")
        out.append(dataclasses.replace(s, train=train, train_weights=w, process_local=True))
    return out


# ----------------------------------------------------------------------------- grain pipeline


def _example(source: SourceData, source_id: int):
    ones = np.ones(len(source.train[0]), np.float32)

    def fn(i) -> dict:
        w = ones if source.train_weights is None else source.train_weights[i]
        tokens = np.asarray(source.train[i], np.int32)
        ex = {"tokens": tokens, "weights": np.asarray(w, np.float32),
              "source": np.int32(source_id)}
        if source.documents:
            ex["segment_ids"], ex["positions"] = document_segments(tokens, source.eos_id)
        return ex

    return fn


def mixed_dataset(sources: Sequence[SourceData], seed: int = 0) -> grain.MapDataset:
    """An infinite MapDataset of ``{"tokens": [T], "weights": [T], "source": id}`` (with
    ``segment_ids`` and ``positions`` [T] for packed documents) mixing sources by weight.

    Each source is shuffled with ``seed + index`` and reshuffled every epoch; sources with
    weight 0 are left out. ``source`` is the index into ``sources``.
    """
    if len({s.documents for s in sources if s.weight > 0}) > 1:
        raise ConfigError("data.sources: packed documents and streamed windows in one mixture")
    parts, weights = [], []
    for i, s in enumerate(sources):
        if s.weight <= 0:
            continue
        ds = grain.MapDataset.source(np.arange(len(s.train))).seed(seed + i).shuffle()
        parts.append(ds.repeat(None).map(_example(s, i)))
        weights.append(float(s.weight))
    if not parts:
        raise ConfigError("data.sources: all weights are 0")
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, weights)


def check_batch(global_batch: int, process_count: int) -> int:
    """The per-process batch; refuses a global batch the processes cannot share evenly."""
    if global_batch % process_count:
        raise ConfigError(f"batch={global_batch} is not divisible by the {process_count} "
                          "processes")
    return global_batch // process_count


def process_shard(ds: grain.MapDataset, process_index: int, process_count: int
                  ) -> grain.MapDataset:
    """This process's examples of a global example stream: elements ``p, p + P, ...``.

    Global batch ``i`` is elements ``i * B ... (i + 1) * B - 1`` of ``ds``; process ``p`` gets
    its ``B / P`` strided rows, so the processes together hold each global batch exactly, the
    result does not depend on the number of processes, and a lazy source (any ``SourceData``
    whose windows are read on demand) is read only where this process needs it.
    """
    return ds[process_index::process_count]


def batch_iterator(ds: grain.MapDataset, global_batch: int, *, process_index: int = 0,
                   process_count: int = 1, state: dict | None = None, local: bool = False):
    """An iterator of this process's share of each global batch (a dict of [b, T] arrays).

    Args:
      ds: the (infinite) example dataset from :func:`mixed_dataset`.
      global_batch: sequences per step over all processes.
      state: an iterator state from ``get_state()`` to resume from.
      local: ``ds`` is this process's own mixture (:func:`local_shares`): take every element
        (default: ``ds`` is the global stream and this process takes its strided rows).
    Returns:
      A grain ``DatasetIterator``; ``get_state()`` / ``set_state()`` checkpoint it.
    """
    rows = check_batch(global_batch, process_count)
    mine = ds if local else process_shard(ds, process_index, process_count)
    it = iter(mine.batch(rows, drop_remainder=True).to_iter_dataset())
    if state is not None:
        it.set_state(state)
    return it


def eval_windows(source: SourceData, max_windows: int) -> np.ndarray | dict:
    """The first ``max_windows`` held-out windows of a source (fixed, not shuffled): the token
    array [n, T] for a streamed text source; else a dict ``{"tokens": [n, T], ...}`` with the
    loss ``weights`` [n, T] of a chat source (its eval scores only the weighted tokens) and the
    ``segment_ids`` and ``positions`` [n, T] of packed documents."""
    n = min(max_windows, len(source.eval))
    tokens = _first_rows(source.eval, n)
    if source.eval_weights is None and not source.documents:
        return tokens
    out = {"tokens": tokens}
    if source.eval_weights is not None:
        out["weights"] = _first_rows(source.eval_weights, n)
    if source.documents:
        out["segment_ids"], out["positions"] = document_segments(tokens, source.eos_id)
    return out


def _first_rows(windows, n: int) -> np.ndarray:
    """The first ``n`` rows of an array or of any random-access sequence of windows."""
    if isinstance(windows, np.ndarray) or n == 0:
        return np.asarray(windows[:n])
    return np.stack([np.asarray(windows[i]) for i in range(n)])
