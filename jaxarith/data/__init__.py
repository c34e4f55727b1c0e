"""Training data: sources, chat rendering, pre-tokenised shards and the grain pipeline.

- ``pipeline``: :class:`DataConfig` / :class:`SourceConfig` (text, jsonl, ``datasets``, chat,
  tokenised sources), tokenising and packing into windows, the replay mixture and the per-process
  batch iterator;
- ``chat``: chat conversations rendered with the tokenizer's template, answer-only masks;
- ``tokenized``: ``jaxarith data tokenize``: documents to token shards with a manifest, read back
  as windows;
- ``assets``: the bundled corpora, instruction data and tokenizer (offline tests and the demo).
"""

from jaxarith.data.pipeline import (
    DataConfig,
    SourceConfig,
    SourceData,
    SourceKind,
    batch_iterator,
    load_sources,
    mixed_dataset,
)

__all__ = ["DataConfig", "SourceConfig", "SourceData", "SourceKind", "batch_iterator",
           "load_sources", "mixed_dataset"]
