"""Training data: sources, chat rendering, pre-tokenised shards and the grain pipeline.

- ``sources``: :class:`DataConfig` / :class:`SourceConfig` (text, jsonl, parquet, ``datasets``,
  chat and tokenised sources) and how their documents are read;
- ``pipeline``: tokenising and packing into windows, the held-out split, the replay mixture and
  the per-process batch iterator;
- ``chat``: chat conversations rendered with the tokenizer's template, answer-only masks;
- ``tokenized``: ``jaxarith data tokenize``: documents to token shards with a manifest, read back
  as windows;
- ``assets``: the bundled corpora, instruction data and tokenizer (offline tests and the demo).

Example::

    from jaxarith import data
    cfg = data.DataConfig(seq_len=128, sources=(data.SourceConfig(name="code",
                                                                  path="bundled:code"),))
    sources = data.load_sources(cfg, tokenizer)
    batches = data.batch_iterator(data.mixed_dataset(sources, seed=0), global_batch=8)
"""

from jaxarith.data.pipeline import (
    batch_iterator,
    check_batch,
    document_segments,
    eval_windows,
    load_source,
    load_sources,
    local_shares,
    mixed_dataset,
    pack,
    split_documents,
    stream_positions,
    tokenize,
)
from jaxarith.data.sources import (
    BUNDLED,
    DataConfig,
    Packing,
    SourceConfig,
    SourceData,
    SourceKind,
    open_dataset,
    read_chats,
    read_documents,
    stream_documents,
    stream_eval_count,
)

__all__ = ["BUNDLED", "DataConfig", "Packing", "SourceConfig", "SourceData", "SourceKind",
           "batch_iterator", "check_batch", "document_segments", "eval_windows", "load_source",
           "load_sources", "local_shares", "mixed_dataset", "open_dataset", "pack",
           "read_chats", "read_documents", "split_documents", "stream_documents",
           "stream_eval_count", "stream_positions", "tokenize"]
