"""Pre-tokenised training data: packed token windows in ArrayRecord shards, read by random access.

``jaxarith data tokenize SOURCES... OUT --tokenizer REF --seq-len T`` runs the text sources'
pipeline of :mod:`jaxarith.data.pipeline` once, ahead of training, and writes its result to disk::

    OUT/manifest.json                 format, tokenizer (sha256 of its serialisation, EOS/BOS ids),
                                      seq_len, add_bos, eval_fraction, window/token/document counts,
                                      each input file (size, sha256), each shard (size, sha256)
    OUT/train-00000.array_record      one record per window: seq_len token ids (uint16 when the
    OUT/eval-00000.array_record       vocabulary fits, else int32), ArrayRecord group_size 1

The windows are exactly those of a ``kind: text | jsonl | parquet | datasets`` source read with
the same options: the same documents (empty ones dropped, ``max_docs``), the same held-out split
(the last ``eval_fraction`` of the documents), EOS after every document (BOS before, with
``add_bos``), concatenated and cut into ``seq_len`` windows with the remainder dropped. A
``kind: tokenized`` source (``path: OUT``) therefore gives a training run the same windows, hence
bit-identical batches for the same seed, mixture weights and resume state.

Reading is random access (grain's ``ArrayRecordDataSource``): the windows stay on disk and the
mixing/shuffling/per-process slicing of :func:`jaxarith.data.pipeline.mixed_dataset` and
:func:`jaxarith.data.pipeline.batch_iterator` index them like an in-memory array, so host memory
does not grow with the corpus beyond ArrayRecord's in-memory index (about 50 bytes per window).
Shards are kept small (``shard_windows``, default 16384): array_record's reads from several threads
(grain prefetches in threads) hold transient memory proportional to the records of the *shard* read,
measured at ~60 MB for one 350k-window shard against ~10 MB for the same windows in 8k shards.

Writing streams: documents are read file by file (the largest *file* bounds memory), tokenised
in batches by a thread pool (the Rust tokenizer releases the GIL), and packed into shards of
``shard_windows`` windows inside an :func:`jaxarith.io.atomic.atomic_dir`, so a failed or killed
run leaves no output behind (a re-run starts over).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from jaxarith.data import sources
from jaxarith.data.assets import bundled_tokenizer
from jaxarith.data.sources import SourceData
from jaxarith.errors import ConfigError, JaxarithError
from jaxarith.io import paths as url_paths
from jaxarith.io.atomic import atomic_dir, check_destination
from jaxarith.io.refs import load_tokenizer as load

FORMAT = "jaxarith.tokenized/1"  # a file-format tag written into data: never renamed
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")
KINDS = ("text", "jsonl", "parquet", "datasets")


class TokenizedDataError(JaxarithError):
    """A tokenised data directory is missing, corrupt, or disagrees with the run."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """How documents are read, as for a text source (:class:`jaxarith.data.pipeline.SourceConfig`).

    Attributes:
      kind: text | jsonl | parquet | datasets, or "" to infer from each path (a directory is a
        ``datasets`` dataset, ``.jsonl`` / ``.parquet`` by suffix, anything else text).
      text_field: column / key holding the text (jsonl, parquet, datasets).
      split: ``datasets`` split.
      doc_separator: text files are split into documents at this string.
      max_docs: read at most this many documents (0: all).
    """

    kind: str = ""
    text_field: str = "text"
    split: str = "train"
    doc_separator: str = "\n\n"
    max_docs: int = 0

    def __post_init__(self):
        if self.kind and self.kind not in KINDS:
            raise ConfigError(f"--kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.max_docs < 0:
            raise ConfigError(f"--max-docs {self.max_docs}: must be >= 0")


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(ref: str):
    """``bundled`` (the bundled BPE), a directory holding tokenizer files (HF model, Orbax
    checkpoint, tokenizer directory) or a hub id: what a run's ``model.tokenizer`` names."""
    if ref == "bundled":
        return bundled_tokenizer()

    path = os.path.expanduser(ref)
    return load(path if os.path.isdir(path) else ref)


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides the token ids: the tokenizer's serialisation and EOS/BOS ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(
        sorted(tokenizer.get_vocab().items()))
    extra = json.dumps({"eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id})
    return hashlib.sha256((body + extra).encode()).hexdigest()


# ----------------------------------------------------------------------------- reading inputs


def expand_inputs(paths: Sequence[str]) -> list[str]:
    """Input paths in the order given; a glob expands sorted (as a text source's ``path``);
    ``bundled:code`` / ``bundled:docs`` name the bundled corpora."""
    out = []
    for p in paths:
        p = sources.BUNDLED.get(p, os.path.expanduser(p))
        hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not hits or not os.path.exists(hits[0]):
            raise ConfigError(f"input {p}: no such file or directory")
        missing = [h for h in hits if not os.path.exists(h)]
        if missing:
            raise ConfigError(f"input {missing[0]}: no such file or directory")
        out += hits
    return out


def kind_of(path: str, opts: ReadOptions) -> str:
    if opts.kind:
        return opts.kind
    if os.path.isdir(path):
        return "datasets"
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    return "text"


def _file_docs(path: str, kind: str, opts: ReadOptions) -> Iterator[str]:
    """The raw documents of one input (empty ones included: the caller drops them)."""
    src = sources.SourceConfig(name=os.path.basename(path) or path, path=path,
                               kind=sources.SourceKind(kind), text_field=opts.text_field,
                               split=opts.split, doc_separator=opts.doc_separator)
    if kind == "text":
        with open(path, encoding="utf-8") as fh:
            yield from (d.strip("\n") for d in fh.read().split(opts.doc_separator))
    elif kind == "jsonl":
        yield from sources.read_jsonl(src, path)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if opts.text_field not in pf.schema_arrow.names:
            raise JaxarithError(f"{path}: no column {opts.text_field!r} "
                                f"(columns: {pf.schema_arrow.names})")
        for batch in pf.iter_batches(columns=[opts.text_field], batch_size=4096):
            yield from (str(t) for t in batch.column(0).to_pylist())
    else:
        yield from _dataset_docs(path, opts)


def _dataset_docs(path: str, opts: ReadOptions) -> Iterator[str]:
    """A ``datasets`` dataset (see :func:`jaxarith.data.pipeline.open_dataset`), read in batches."""
    ds = sources.open_dataset(path, opts.split, opts.text_field, "data tokenize")
    for batch in ds.select_columns([opts.text_field]).iter(batch_size=1024):
        yield from (str(t) for t in batch[opts.text_field])


def iter_documents(paths: Sequence[str], opts: ReadOptions) -> Iterator[str]:
    """The non-empty documents of ``paths`` in order, as
    :func:`jaxarith.data.pipeline.read_documents` gives them (the same ``max_docs`` rule: stop
    after the file that reaches it, keep the first ``max_docs`` non-empty documents)."""
    raw = kept = 0
    for path in paths:
        for d in _file_docs(path, kind_of(path, opts), opts):
            raw += 1
            if d.strip():
                if opts.max_docs and kept >= opts.max_docs:
                    return
                kept += 1
                yield d
        if opts.max_docs and raw >= opts.max_docs:
            return


def n_eval_docs(n: int, eval_fraction: float) -> int:
    """How many of ``n`` documents are held out (:func:`jaxarith.data.pipeline.split_documents`)."""
    k = int(round(n * eval_fraction))
    if eval_fraction > 0:
        k = min(max(k, 1), n - 1)
    return k


def file_info(path: str) -> dict:
    """Size and sha256 of an input (a directory: over its files, by relative path)."""
    h, size = hashlib.sha256(), 0
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
    for f in files:
        if f != path:
            h.update(os.path.relpath(f, path).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
    return {"path": os.path.abspath(path), "bytes": size, "sha256": h.hexdigest()}


# ----------------------------------------------------------------------------- writing


class _ShardWriter:
    """Cuts a token stream into windows and writes them to ``PREFIX-NNNNN.array_record``."""

    def __init__(self, directory: str, prefix: str, seq_len: int, dtype: np.dtype,
                 shard_windows: int):
        self.directory, self.prefix, self.seq_len = directory, prefix, seq_len
        self.dtype, self.shard_windows = dtype, shard_windows
        self.buf = np.zeros(0, np.int64)
        self.shards: list[dict] = []
        self.windows = self.tokens = self.documents = 0
        self._writer = None
        self._in_shard = 0

    def add(self, tokens: np.ndarray, documents: int) -> None:
        self.tokens += len(tokens)
        self.documents += documents
        buf = np.concatenate([self.buf, tokens]) if len(self.buf) else tokens
        n = len(buf) // self.seq_len
        for w in buf[: n * self.seq_len].reshape(n, self.seq_len):
            self._write(w)
        self.buf = buf[n * self.seq_len:]

    def _write(self, window: np.ndarray) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None:
            name = f"{self.prefix}-{len(self.shards):05d}.array_record"
            self.shards.append({"file": name, "windows": 0})
            self._writer = ArrayRecordWriter(os.path.join(self.directory, name), "group_size:1")
        self._writer.write(window.astype(self.dtype).tobytes())
        self.shards[-1]["windows"] += 1
        self.windows += 1
        if self.shards[-1]["windows"] == self.shard_windows:
            self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self) -> dict:
        """Close the last shard; the split's manifest entry (the remainder is dropped)."""
        self._close()
        for s in self.shards:
            s.update({k: v for k, v in file_info(os.path.join(self.directory, s["file"])).items()
                      if k != "path"})
        return {"windows": self.windows, "documents": self.documents, "tokens": self.tokens,
                "dropped_tokens": int(len(self.buf)), "shards": self.shards}


def _batches(docs: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoder(tokenizer, add_bos: bool):
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None:
        raise JaxarithError("the tokenizer has no EOS token to separate documents")
    if add_bos and bos is None:
        raise JaxarithError("--add-bos is set but the tokenizer has no BOS token")
    head = [bos] if add_bos else []

    def encode(docs: list[str]) -> tuple[np.ndarray, int]:
        # the same call as jaxarith.data.pipeline.tokenize: per-document ids do not depend on the
        # batch
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        lens = np.fromiter(map(len, ids), np.int64, count=len(ids))
        extra = 1 + len(head)
        ends = np.cumsum(lens + extra)  # one past each document's EOS
        out = np.empty(int(ends[-1]), np.int64)
        special = np.zeros(len(out), bool)
        special[ends - 1] = True
        out[ends - 1] = eos
        if head:
            special[ends - lens - extra] = True
            out[ends - lens - extra] = head[0]
        out[~special] = np.fromiter(itertools.chain.from_iterable(ids), np.int64,
                                    count=int(lens.sum()))
        return out, len(docs)

    return encode


def _ordered_map(fn, items: Iterable, workers: int) -> Iterator:
    """``map(fn, items)`` on a thread pool, in order, with at most ``2 * workers`` in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: list[concurrent.futures.Future] = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


def tokenize_to_dir(inputs: Sequence[str], out: str, *, tokenizer_ref: str, seq_len: int,
                    opts: ReadOptions = ReadOptions(), eval_fraction: float = 0.05,
                    add_bos: bool = False, workers: int = 0, batch_docs: int = 256,
                    shard_windows: int = 16384, overwrite: bool = False,
                    progress: bool = False) -> dict:
    """Tokenise and pack ``inputs`` into ``out`` (see the module docstring).

    Args:
      inputs: files, globs, ``datasets`` directories, ``bundled:code`` / ``bundled:docs``;
        documents are read in this order (a glob sorted), as one source.
      out: the output directory (written atomically); a URL (``gs://``, any fsspec filesystem)
        is written locally, then uploaded marker last (jaxarith.io.paths.staged_output).
      tokenizer_ref: ``bundled`` or a directory with tokenizer files.
      seq_len: tokens per window (the run's ``data.seq_len``).
      opts: how documents are read.
      eval_fraction: the run's ``data.eval_fraction`` (the held-out split, by documents).
      add_bos: the run's ``data.add_bos``.
      workers: tokenising threads (0: the number of CPUs).
      batch_docs: documents per tokenizer call.
      shard_windows: windows per ArrayRecord shard.
      overwrite: replace an ``out`` written by jaxarith.
      progress: a progress bar (documents) on stderr.
    Returns:
      the manifest (also written to ``out/manifest.json``).
    """
    from tqdm.auto import tqdm

    if url_paths.is_url(out):  # written locally, then uploaded marker last
        with url_paths.staged_output(out, kind="tokenized data", overwrite=overwrite) as local:
            return tokenize_to_dir(inputs, local, tokenizer_ref=tokenizer_ref, seq_len=seq_len,
                                   opts=opts, eval_fraction=eval_fraction, add_bos=add_bos,
                                   workers=workers, batch_docs=batch_docs,
                                   shard_windows=shard_windows, progress=progress)
    if seq_len < 2:
        raise ConfigError(f"--seq-len {seq_len}: must be at least 2")
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"--eval-fraction {eval_fraction}: must be in [0, 1)")
    for flag, v in (("batch-docs", batch_docs), ("shard-windows", shard_windows)):
        if v < 1:
            raise ConfigError(f"--{flag} {v}: must be at least 1")
    if workers < 0:
        raise ConfigError(f"--workers {workers}: must be >= 0")
    paths = expand_inputs(inputs)
    check_destination(out, overwrite, inputs=paths)
    tokenizer = load_tokenizer(tokenizer_ref)
    encode = _encoder(tokenizer, add_bos)
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.int32)

    n_docs = sum(1 for _ in iter_documents(paths, opts))  # pass 1: where the held-out split is
    if n_docs == 0:
        raise JaxarithError(f"no documents in {', '.join(paths)}")
    n_train = n_docs - n_eval_docs(n_docs, eval_fraction)
    workers = workers or os.cpu_count() or 1
    with atomic_dir(out, overwrite=overwrite, inputs=paths, kind="tokenized data") as tmp:
        writers = {s: _ShardWriter(tmp, s, seq_len, dtype, shard_windows) for s in SPLITS}
        bar = tqdm(total=n_docs, desc="tokenize", unit="doc", disable=not progress)

        def split_batches() -> Iterator[tuple[str, list[str]]]:
            docs = iter_documents(paths, opts)
            for name, count in (("train", n_train), ("eval", n_docs - n_train)):
                for b in _batches(itertools.islice(docs, count), batch_docs):
                    yield name, b

        def work(item):
            name, docs = item
            return name, *encode(docs)

        for name, tokens, n in _ordered_map(work, split_batches(), workers):
            writers[name].add(tokens, n)
            bar.update(n)
        bar.close()
        splits = {s: w.finish() for s, w in writers.items()}
        if splits["train"]["windows"] == 0:
            raise JaxarithError(f"fewer than seq_len={seq_len} tokens of training text in "
                                f"{', '.join(paths)}")
        manifest = {
            "format": FORMAT, "seq_len": seq_len, "dtype": dtype.name, "add_bos": add_bos,
            "eval_fraction": eval_fraction,
            "tokenizer": {"ref": tokenizer_ref, "sha256": tokenizer_hash(tokenizer),
                          "vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id,
                          "bos_id": tokenizer.bos_token_id},
            "read": dataclasses.asdict(opts),
            "inputs": [{**file_info(p), "kind": kind_of(p, opts)} for p in paths],
            "splits": splits,
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
    return manifest


# ----------------------------------------------------------------------------- reading windows


def read_manifest(directory: str, what: str = "tokenized data") -> dict:
    """The manifest of a tokenised data directory, checked for its format and shard files."""
    path = os.path.join(os.path.expanduser(directory), MANIFEST)
    if not os.path.isfile(path):
        raise TokenizedDataError(f"{what}: no {MANIFEST} in {directory} (write one with "
                                 "`jaxarith data tokenize`)")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizedDataError(f"{what}: unreadable {path} ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise TokenizedDataError(f"{what}: {path} is not a {FORMAT} manifest")
    for split in SPLITS:
        for s in m["splits"][split]["shards"]:
            f = os.path.join(os.path.expanduser(directory), s["file"])
            if not os.path.isfile(f):
                raise TokenizedDataError(f"{what}: shard {f} is missing")
            if os.path.getsize(f) != s["bytes"]:
                raise TokenizedDataError(f"{what}: shard {f} is corrupt ({os.path.getsize(f)} "
                                         f"bytes, the manifest says {s['bytes']})")
    return m


class TokenWindows:
    """The windows of one split, read on demand: ``len``, ``shape`` ``(N, T)``, ``w[i]`` -> [T]
    int32, ``w[a:b]`` -> [n, T] int32 (what :mod:`jaxarith.data.pipeline` does with a window
    array)."""

    def __init__(self, directory: str, manifest: dict, split: str):
        from grain.sources import ArrayRecordDataSource

        info = manifest["splits"][split]
        self.directory = os.path.expanduser(directory)
        self.seq_len = int(manifest["seq_len"])
        self.dtype = np.dtype(np.int32)
        self._stored = np.dtype(manifest["dtype"])
        self._n = int(info["windows"])
        self.shape = (self._n, self.seq_len)
        # "[0:n]": the counts come from the manifest, so no shard is opened before it is read
        paths = [f"{os.path.join(self.directory, s['file'])}[0:{s['windows']}]"
                 for s in info["shards"]]
        self._source = ArrayRecordDataSource(paths) if paths else None

    def __len__(self) -> int:
        return self._n

    def _read(self, i: int) -> np.ndarray:
        try:
            raw = self._source[i]
        except Exception as e:  # a damaged shard: name the directory, not a riegeli internal
            raise TokenizedDataError(f"tokenized data {self.directory}: cannot read window {i} "
                                     f"({type(e).__name__}: {e}); the shard is corrupt, "
                                     "re-run `jaxarith data tokenize`") from None
        w = np.frombuffer(raw, self._stored)
        if w.shape != (self.seq_len,):
            raise TokenizedDataError(f"tokenized data {self.directory}: window {i} holds "
                                     f"{w.size} tokens, expected {self.seq_len}; corrupt shard")
        return w.astype(np.int32)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            idx = range(*key.indices(self._n))
            return np.stack([self._read(i) for i in idx]) if len(idx) else \
                np.zeros((0, self.seq_len), np.int32)
        i = int(key)
        if not -self._n <= i < self._n:
            raise IndexError(f"window {i} out of range ({self._n})")
        return self._read(i % self._n)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self._read(i) for i in range(self._n))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def reshape(self, *shape) -> np.ndarray:
        """The whole split as an array (held-out sets are small), reshaped."""
        return np.asarray(self).reshape(*shape)


def check_compatible(manifest: dict, directory: str, *, name: str, seq_len: int, tokenizer,
                     add_bos: bool, eval_fraction: float) -> None:
    """Refuse tokenised data that would not give the run's windows (names source and key)."""
    where = f"data source {name!r} ({directory})"
    if manifest["seq_len"] != seq_len:
        raise TokenizedDataError(f"{where}: tokenised with seq_len={manifest['seq_len']} but "
                                 f"data.seq_len={seq_len}; re-tokenise with --seq-len {seq_len}")
    have = tokenizer_hash(tokenizer)
    if manifest["tokenizer"]["sha256"] != have:
        raise TokenizedDataError(
            f"{where}: tokenised with another tokenizer ({manifest['tokenizer']['ref']}, sha256 "
            f"{manifest['tokenizer']['sha256'][:12]}) than the run's (sha256 {have[:12]})")
    if bool(manifest["add_bos"]) != bool(add_bos):
        raise TokenizedDataError(f"{where}: tokenised with add_bos={manifest['add_bos']} but "
                                 f"data.add_bos={add_bos}")
    if float(manifest["eval_fraction"]) != float(eval_fraction):
        raise TokenizedDataError(
            f"{where}: tokenised with eval_fraction={manifest['eval_fraction']} but "
            f"data.eval_fraction={eval_fraction}; re-tokenise with --eval-fraction "
            f"{eval_fraction}")


def load_source(src, tokenizer, cfg):
    """A ``kind: tokenized`` source as :class:`jaxarith.data.pipeline.SourceData` whose window
    arrays are :class:`TokenWindows` (read on demand)."""

    if src.max_docs:
        raise ConfigError(f"data.sources.{src.name}.max_docs: applies when tokenising "
                          "(`jaxarith data tokenize --max-docs`), not to a tokenized source")
    m = read_manifest(src.path, f"data source {src.name!r}")
    check_compatible(m, src.path, name=src.name, seq_len=cfg.seq_len, tokenizer=tokenizer,
                     add_bos=cfg.add_bos, eval_fraction=cfg.eval_fraction)
    return SourceData(src.name, src.weight, TokenWindows(src.path, m, "train"),
                      TokenWindows(src.path, m, "eval"))
