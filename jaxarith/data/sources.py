"""Data sources: their configs and how their documents are read (text, jsonl, parquet,
``datasets``, chat jsonl), before any tokenising.

``bundled:code``, ``bundled:docs``, ``bundled:instruct`` and ``bundled:instruct_eval`` name the
corpora shipped in :mod:`jaxarith.data.assets`. The tokenised pipeline is
:mod:`jaxarith.data.pipeline`; pre-tokenised shards are :mod:`jaxarith.data.tokenized`.
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import os

import numpy as np

from jaxarith.data import chat
from jaxarith.data.assets import CORPUS_CODE, CORPUS_DOCS, INSTRUCT_EVAL, INSTRUCT_TRAIN
from jaxarith.errors import ConfigError, JaxarithError

BUNDLED = {"bundled:code": CORPUS_CODE, "bundled:docs": CORPUS_DOCS,
           "bundled:instruct": INSTRUCT_TRAIN, "bundled:instruct_eval": INSTRUCT_EVAL}


class SourceKind(enum.StrEnum):
    TEXT = "text"
    JSONL = "jsonl"
    PARQUET = "parquet"
    DATASETS = "datasets"
    CHAT = "chat"  # jsonl of {"messages": [...]}, one conversation per window
    TOKENIZED = "tokenized"  # a `jaxarith data tokenize` directory, read on demand


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One data source.

    Attributes:
      name: label used in metrics (``eval/<name>/loss``).
      kind: text | jsonl | parquet | datasets | chat (a jsonl of ``{"messages": [...]}``;
        ``bundled:instruct`` is the bundled instruction set) | tokenized (a directory written by
        ``jaxarith data tokenize``, read on demand: :mod:`jaxarith.data.tokenized`).
      path: a file, a glob, ``bundled:code`` / ``bundled:docs``; for ``datasets`` a hub name,
        a local data directory, or a directory written by ``Dataset.save_to_disk``.
      weight: mixing weight (normalised over sources; 0 drops the source from training).
      text_field: column / key holding the text (jsonl, parquet, datasets).
      split: ``datasets`` split.
      doc_separator: text files are split into documents at this string.
      max_docs: read at most this many documents (0: all).
    """

    name: str
    path: str
    kind: SourceKind = SourceKind.TEXT
    weight: float = 1.0
    text_field: str = "text"
    split: str = "train"
    doc_separator: str = "\n\n"
    max_docs: int = 0

    def __post_init__(self):
        try:
            object.__setattr__(self, "kind", SourceKind(self.kind))
        except ValueError:
            raise ConfigError(f"data.sources.{self.name}.kind={self.kind!r}: expected one of "
                              f"{', '.join(k.value for k in SourceKind)}") from None
        if self.weight < 0:
            raise ConfigError(f"data.sources.{self.name}.weight={self.weight} must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Sources and packing.

    Attributes:
      sources: the sources, mixed by their weights.
      seq_len: tokens per packed sequence.
      seed: shuffle seed (each source uses ``seed + index``).
      eval_fraction: fraction of each source's documents held out for evaluation.
      add_bos: put the tokenizer's BOS token before every document.
    """

    sources: tuple[SourceConfig, ...] = ()
    seq_len: int = 128
    seed: int = 0
    eval_fraction: float = 0.05
    add_bos: bool = False

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        if not self.sources:
            raise ConfigError("data.sources is empty: give at least one source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: duplicate names in {names}")
        if sum(s.weight for s in self.sources) <= 0:
            raise ConfigError("data.sources: all weights are 0")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len} must be >= 2")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class SourceData:
    """A source's token windows: ``train`` [N, T] and held-out ``eval`` [M, T] (int32), with
    their loss weights (float32, same shapes; None means all ones).

    The loader interface: ``train`` / ``eval`` (and the weights) may be any random-access
    sequence of windows (``len()`` and ``x[i] -> [T]``), e.g. records read from disk on demand;
    the pipeline then reads, in each process, only the rows of that process's share of every
    global batch (:func:`process_shard`)."""

    name: str
    weight: float
    train: np.ndarray
    eval: np.ndarray
    train_weights: np.ndarray | None = None
    eval_weights: np.ndarray | None = None


def _files(src: SourceConfig) -> list[str]:
    path = BUNDLED.get(src.path, os.path.expanduser(src.path))
    files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        bad = missing[0] if missing else path
        raise JaxarithError(f"data source {src.name!r}: no such file {bad}")
    return files


def read_documents(src: SourceConfig) -> list[str]:
    """The source's documents as strings, in file order."""
    docs: list[str] = []
    if src.kind is SourceKind.DATASETS:
        docs = _read_datasets(src)
    else:
        for f in _files(src):
            if src.kind is SourceKind.TEXT:
                with open(f, encoding="utf-8") as fh:
                    docs += [d.strip("\n") for d in fh.read().split(src.doc_separator)]
            elif src.kind is SourceKind.JSONL:
                docs += read_jsonl(src, f)
            else:
                import pyarrow.parquet as pq

                table = pq.read_table(f)
                if src.text_field not in table.column_names:
                    raise JaxarithError(f"{f}: no column {src.text_field!r} (data source "
                                        f"{src.name!r}; columns: {table.column_names})")
                docs += [str(t) for t in table.column(src.text_field).to_pylist()]
            if src.max_docs and len(docs) >= src.max_docs:
                break
    docs = [d for d in docs if d.strip()]
    if src.max_docs:
        docs = docs[: src.max_docs]
    if not docs:
        raise JaxarithError(f"data source {src.name!r}: no documents in {src.path}")
    return docs


def read_jsonl(src: SourceConfig, path: str) -> list[str]:
    """The ``text_field`` of every record of the jsonl file ``path``."""
    out = []
    for n, obj in chat.jsonl_records(path):
        if not isinstance(obj, dict) or src.text_field not in obj:
            raise JaxarithError(f"{path}:{n}: no key {src.text_field!r} "
                                f"(data source {src.name!r})")
        out.append(str(obj[src.text_field]))
    return out


def open_dataset(path: str, split: str, text_field: str, what: str):
    """A ``datasets`` dataset: saved with ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict``
    and its ``split``), else ``datasets.load_dataset(path, split=split)`` (a local builder or data
    directory, or a hub id); ``text_field`` must be a column. ``what`` names the caller in
    errors."""
    import datasets

    path = os.path.expanduser(path)
    if os.path.exists(os.path.join(path, "dataset_info.json")) or \
            os.path.exists(os.path.join(path, "dataset_dict.json")):
        ds = datasets.load_from_disk(path)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(path, split=split)
    if text_field not in ds.column_names:
        raise JaxarithError(f"{what}: dataset {path} has no column {text_field!r} "
                            f"(columns: {ds.column_names})")
    return ds


def _read_datasets(src: SourceConfig) -> list[str]:
    ds = open_dataset(src.path, src.split, src.text_field, f"data source {src.name!r}")
    if src.max_docs:
        ds = ds.select(range(min(src.max_docs, len(ds))))
    return [str(t) for t in ds[src.text_field]]


def read_chats(src: SourceConfig) -> list[list[dict]]:
    """A chat source's conversations, in file order."""
    convs = [c for f in _files(src) for c in chat.read_jsonl(f)]
    if src.max_docs:
        convs = convs[: src.max_docs]
    if not convs:
        raise JaxarithError(f"data source {src.name!r}: no conversations in {src.path}")
    return convs
