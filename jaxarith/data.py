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
source (``jaxarith data tokenize``, :mod:`jaxarith.tokenized`), whose windows stay on disk and are
read by index: the same windows as the text source, so the same batches.

Loss weights. Every example is ``{"tokens": [T] int32, "weights": [T] float32, "source": id}``;
``weights`` is the loss weight of each token as a prediction target. Text sources have all ones,
so text and chat sources mix in one batch. A ``kind: chat`` source is a jsonl of
``{"messages": [{"role", "content"}, ...]}`` rendered by :mod:`jaxarith.chat` (the tokenizer's
chat template, or the built-in template for the bundled tokenizer) with weight 1 on assistant
tokens only. Chat sources are **not packed**: each conversation gets its own window, right-padded
(weight 0), so conversations never share a window and no attention or loss crosses between them
(text sources are packed and their documents, separated by EOS, do attend to earlier documents in
the same window, as in usual pre-training).
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import os
from collections.abc import Sequence

import grain
import numpy as np

from jaxarith.assets import CORPUS_CODE, CORPUS_DOCS, INSTRUCT_EVAL, INSTRUCT_TRAIN
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
        ``jaxarith data tokenize``, read on demand: :mod:`jaxarith.tokenized`).
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
    process_local: bool = False  # train windows are this process's share (a streamed source)
    position: dict | None = None  # where a streamed source stopped (saved with checkpoints)


# ----------------------------------------------------------------------------- reading


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
                docs += _read_jsonl(src, f)
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


def _read_jsonl(src: SourceConfig, path: str) -> list[str]:
    from jaxarith.chat import jsonl_records

    out = []
    for n, obj in jsonl_records(path):
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


def split_documents(docs: Sequence, eval_fraction: float) -> tuple[list, list]:
    """(train, held-out): the last ``eval_fraction`` of the documents (at least one, at most all
    but one, when the fraction is positive)."""
    n_eval = int(round(len(docs) * eval_fraction))
    if eval_fraction > 0:
        n_eval = min(max(n_eval, 1), len(docs) - 1)
    return list(docs[: len(docs) - n_eval]), list(docs[len(docs) - n_eval:])


def read_chats(src: SourceConfig) -> list[list[dict]]:
    """A chat source's conversations, in file order."""
    from jaxarith import chat

    convs = [c for f in _files(src) for c in chat.read_jsonl(f)]
    if src.max_docs:
        convs = convs[: src.max_docs]
    if not convs:
        raise JaxarithError(f"data source {src.name!r}: no conversations in {src.path}")
    return convs


def load_chat_source(src: SourceConfig, tokenizer, cfg: DataConfig) -> SourceData:
    """Render a chat source one conversation per window, with assistant-only loss weights."""
    from jaxarith import chat

    train_c, eval_c = split_documents(read_chats(src), cfg.eval_fraction)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id

    def windows(convs):
        return chat.pad_windows([chat.render(c, tokenizer, add_bos=cfg.add_bos) for c in convs],
                                cfg.seq_len, pad)

    train, train_w = windows(train_c)
    evals, eval_w = windows(eval_c)
    return SourceData(src.name, src.weight, train, evals, train_w, eval_w)


def load_source(src: SourceConfig, tokenizer, cfg: DataConfig, *, process_index: int = 0,
                process_count: int = 1) -> SourceData:
    """Read, split, tokenise and pack one source (a streamed source: this process's share of
    its documents, :func:`stream_documents`)."""
    if src.kind is SourceKind.CHAT:
        return load_chat_source(src, tokenizer, cfg)
    if src.kind is SourceKind.TOKENIZED:
        from jaxarith import tokenized

        return tokenized.load_source(src, tokenizer, cfg)
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
                      position=position)


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
        return {"tokens": np.asarray(source.train[i], np.int32),
                "weights": np.asarray(w, np.float32), "source": np.int32(source_id)}

    return fn


def mixed_dataset(sources: Sequence[SourceData], seed: int = 0) -> grain.MapDataset:
    """An infinite MapDataset of ``{"tokens": [T], "weights": [T], "source": id}`` mixing
    sources by weight.

    Each source is shuffled with ``seed + index`` and reshuffled every epoch; sources with
    weight 0 are left out. ``source`` is the index into ``sources``.
    """
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
    array [n, T] for a text source; for a source with loss weights (chat) a dict ``{"tokens":
    [n, T], "weights": [n, T]}`` so that its eval scores only the weighted tokens."""
    n = min(max_windows, len(source.eval))
    if source.eval_weights is None:
        return _first_rows(source.eval, n)
    return {"tokens": _first_rows(source.eval, n),
            "weights": _first_rows(source.eval_weights, n)}


def _first_rows(windows, n: int) -> np.ndarray:
    """The first ``n`` rows of an array or of any random-access sequence of windows."""
    if isinstance(windows, np.ndarray) or n == 0:
        return np.asarray(windows[:n])
    return np.stack([np.asarray(windows[i]) for i in range(n)])
