"""Data sources: their configs and how their documents are read (text, jsonl, parquet,
``datasets``, streamed ``datasets``, chat jsonl), before any tokenising.

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


class Packing(enum.StrEnum):
    """How documents packed into one window see each other (``data.packing``).

    ``documents``: each document is its own segment (a token attends only to earlier tokens of
    its document) and positions restart at 0 at every document start; the batches carry
    ``segment_ids`` and ``positions`` (:func:`jaxarith.data.pipeline.document_segments`).
    ``stream``: the window is one sequence, documents attend to the earlier documents of the
    window (separated by EOS only), positions count from the window start; the batches are
    token windows only.
    """

    DOCUMENTS = "documents"
    STREAM = "stream"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One data source.

    Attributes:
      name: label used in metrics (``eval/<name>/loss``).
      kind: text | jsonl | parquet | datasets | chat (a jsonl of ``{"messages": [...]}``;
        ``bundled:instruct`` is the bundled instruction set) | tokenized (a directory written by
        ``jaxarith data tokenize``, read on demand: :mod:`jaxarith.data.tokenized`).
      path: a file, a glob, ``bundled:code`` / ``bundled:docs``; for ``datasets``
        ``load_dataset``'s ``path``: a hub id, a local data directory, a packaged builder
        (``parquet``, ``json``, ``csv``, ``text`` with ``data_files``), or a directory written
        by ``Dataset.save_to_disk``.
      weight: mixing weight (normalised over sources; 0 drops the source from training).
      text_field: column / key holding the text (jsonl, parquet, datasets).
      split: ``datasets`` split.
      doc_separator: text files are split into documents at this string.
      max_docs: read at most this many documents (0: all).
      subset: ``datasets``: ``load_dataset``'s ``name`` (the dataset's configuration, e.g.
        ``sample-10BT``; ``name`` is the source's label here).
      data_files: ``datasets``: ``load_dataset``'s ``data_files`` (a path or glob, a list, or a
        mapping split -> files; ``hf://`` and local paths).
      streaming: ``datasets``: read the first ``max_docs`` documents as they come
        (``load_dataset(..., streaming=True)``), never the whole dataset; with several
        processes each reads its own share (:func:`stream_documents`). Default: on for a hub id
        with ``max_docs`` set.
    """

    name: str
    path: str
    kind: SourceKind = SourceKind.TEXT
    weight: float = 1.0
    text_field: str = "text"
    split: str = "train"
    doc_separator: str = "\n\n"
    max_docs: int = 0
    subset: str = ""
    data_files: str | list | dict | None = None
    streaming: bool | None = None

    def __post_init__(self):
        key = f"data.sources.{self.name}"
        try:
            object.__setattr__(self, "kind", SourceKind(self.kind))
        except ValueError:
            raise ConfigError(f"{key}.kind={self.kind!r}: expected one of "
                              f"{', '.join(k.value for k in SourceKind)}") from None
        if self.weight < 0:
            raise ConfigError(f"{key}.weight={self.weight} must be >= 0")
        if self.max_docs < 0:
            raise ConfigError(f"{key}.max_docs={self.max_docs} must be >= 0 (0: all)")
        if self.kind is not SourceKind.DATASETS:
            for field in ("subset", "data_files", "streaming"):
                if getattr(self, field) not in ("", None):
                    raise ConfigError(f"{key}.{field} applies to kind: datasets only (this "
                                      f"source is kind: {self.kind.value})")
        files = self.data_files
        ok = lambda v: isinstance(v, str) or (isinstance(v, (list, tuple)) and v and
                                              all(isinstance(x, str) for x in v))
        if files is not None and not (ok(files) or (isinstance(files, dict) and files and all(
                isinstance(k, str) and ok(v) for k, v in files.items()))):
            raise ConfigError(f"{key}.data_files={files!r}: expected a path, a list of paths "
                              "or a mapping split -> path(s)")
        if self.streaming and not self.max_docs:
            raise ConfigError(f"{key}.streaming is on but max_docs is 0: give max_docs (the "
                              "first documents of the stream to read)")

    @property
    def stream(self) -> bool:
        """Whether this source is read as a stream (``streaming``, or its default: a hub id
        with ``max_docs`` set)."""
        if self.kind is not SourceKind.DATASETS:
            return False
        if self.streaming is not None:
            return self.streaming
        return bool(self.max_docs) and _is_hub_id(self.path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Sources and packing.

    Attributes:
      sources: the sources, mixed by their weights.
      seq_len: tokens per packed sequence.
      seed: shuffle seed (each source uses ``seed + index``).
      eval_fraction: fraction of each source's documents held out for evaluation.
      add_bos: put the tokenizer's BOS token before every document.
      packing: ``documents`` (default: no attention across documents, positions per document)
        or ``stream`` (the window is one sequence); see :class:`Packing`.
    """

    sources: tuple[SourceConfig, ...] = ()
    seq_len: int = 128
    seed: int = 0
    eval_fraction: float = 0.05
    add_bos: bool = False
    packing: Packing = Packing.DOCUMENTS

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        try:
            object.__setattr__(self, "packing", Packing(self.packing))
        except ValueError:
            raise ConfigError(f"data.packing={self.packing!r}: expected one of "
                              f"{', '.join(p.value for p in Packing)}") from None
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
    process_local: bool = False  # train windows are this process's share (a streamed source)
    position: dict | None = None  # where a streamed source stopped (saved with checkpoints)
    # packing: documents: examples carry segment_ids / positions; a new document starts after
    # each ``eos_id`` (None: one document per window, e.g. a chat source's conversation)
    documents: bool = False
    eos_id: int | None = None


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


def _is_hub_id(path: str) -> bool:
    """Not a local path and not one of ``datasets``' packaged builders (``parquet``, ...)."""
    if os.path.exists(os.path.expanduser(path)):
        return False
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return path not in _PACKAGED_DATASETS_MODULES


def open_dataset(path: str, split: str, text_field: str, what: str, *, subset: str = "",
                 data_files=None):
    """A ``datasets`` dataset: saved with ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict``
    and its ``split``), else ``datasets.load_dataset(path, subset or None, data_files=...,
    split=split)`` (a local builder or data directory, a packaged builder with ``data_files``,
    or a hub id); ``text_field`` must be a column. ``what`` names the caller in errors."""
    import datasets

    path = os.path.expanduser(path)
    if os.path.exists(os.path.join(path, "dataset_info.json")) or \
            os.path.exists(os.path.join(path, "dataset_dict.json")):
        ds = datasets.load_from_disk(path)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(path, subset or None, data_files=_files_arg(data_files),
                                   split=split)
    if text_field not in ds.column_names:
        raise JaxarithError(f"{what}: dataset {path} has no column {text_field!r} "
                            f"(columns: {ds.column_names})")
    return ds


def _files_arg(data_files):
    """``data_files`` as ``load_dataset`` takes it (YAML lists and ``~`` expanded)."""
    expand = lambda v: os.path.expanduser(v) if isinstance(v, str) else \
        [os.path.expanduser(x) for x in v]
    if data_files is None:
        return None
    if isinstance(data_files, dict):
        return {k: expand(v) for k, v in data_files.items()}
    return expand(data_files)


def _read_datasets(src: SourceConfig) -> list[str]:
    if src.stream:
        train, evals, _ = stream_documents(src)
        return evals + train
    ds = open_dataset(src.path, src.split, src.text_field, f"data source {src.name!r}",
                      subset=src.subset, data_files=src.data_files)
    if src.max_docs:
        ds = ds.select(range(min(src.max_docs, len(ds))))
    return [str(t) for t in ds[src.text_field]]


def stream_eval_count(max_docs: int, eval_fraction: float) -> int:
    """Held-out documents of a streamed source: the first ``round(max_docs * eval_fraction)``
    of the stream (at least one when the fraction is positive, at most ``max_docs - 1``)."""
    n = int(round(max_docs * eval_fraction))
    return min(max(n, 1), max_docs - 1) if eval_fraction > 0 else 0


def stream_documents(src: SourceConfig, eval_fraction: float = 0.0, process_index: int = 0,
                     process_count: int = 1) -> tuple[list[str], list[str], dict]:
    """Read a ``datasets`` source as a stream: the first ``max_docs`` non-empty documents, as
    they come (``load_dataset(..., streaming=True)``), never the rest of the dataset.

    The first :func:`stream_eval_count` documents are held out (every process keeps them, so
    the eval set is the same everywhere); training document ``j`` (counted after them) belongs
    to process ``j % process_count``, so the processes' shares are disjoint and together are
    the stream's first ``max_docs`` documents. Each process tokenises only its share.

    Returns:
      (this process's training documents, the held-out documents, the position: documents
      read from the stream, kept, held out, and the process split) -- saved with checkpoints
      so a resume can tell that it reads the same documents.
    """
    import datasets

    what = f"data source {src.name!r}"
    try:
        ds = datasets.load_dataset(os.path.expanduser(src.path), src.subset or None,
                                   data_files=_files_arg(src.data_files), split=src.split,
                                   streaming=True)
    except (FileNotFoundError, ValueError) as e:
        raise JaxarithError(f"{what}: cannot stream {src.path} "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e})"
                            ) from e
    n_eval = stream_eval_count(src.max_docs, eval_fraction)
    train, evals, seen = [], [], 0
    for record in ds:
        if src.text_field not in record:
            raise JaxarithError(f"{what}: dataset {src.path} has no column {src.text_field!r} "
                                f"(columns: {sorted(record)})")
        text = str(record[src.text_field])
        if not text.strip():
            continue
        if seen < n_eval:
            evals.append(text)
        elif (seen - n_eval) % process_count == process_index:
            train.append(text)
        seen += 1
        if seen >= src.max_docs:
            break
    if not train:
        raise JaxarithError(f"{what}: no training documents in the stream {src.path} "
                            f"({seen} read, {n_eval} held out)")
    position = {"documents": seen, "eval_documents": len(evals), "train_documents": len(train),
                "process_index": process_index, "process_count": process_count}
    return train, evals, position


def read_chats(src: SourceConfig) -> list[list[dict]]:
    """A chat source's conversations, in file order."""
    convs = [c for f in _files(src) for c in chat.read_jsonl(f)]
    if src.max_docs:
        convs = convs[: src.max_docs]
    if not convs:
        raise JaxarithError(f"data source {src.name!r}: no conversations in {src.path}")
    return convs
