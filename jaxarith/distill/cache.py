"""Offline teacher outputs: the teacher's top-k per position, computed once, read while training.

``jaxarith distill cache TEACHER CONFIG.yaml OUT --top-k K`` runs the teacher over every
training window of the config's data sources (the same tokenizer, packing and ``seq_len`` the
training run uses) and writes, for each window, the teacher's top-k ids, their log-probabilities
(temperature 1) and the log of its remaining mass at every position
(:class:`jaxarith.distill.losses.TopK`).
A run with ``distill: {cache: OUT}`` then needs no teacher in memory.

Layout of ``OUT``::

    manifest.json            teacher, k, seq_len, vocabulary, tokenizer fingerprint, sources,
                             packing (documents: the teacher scored each document alone)
    keys.npy                 [R, 3] uint64: (source index, window index, token fingerprint)
    teacher-00000.array_record ...   one record per window, in (source, window) order

Records are keyed by (source, window), not by training step (the data iterator reshuffles every
epoch), and each holds the fingerprint of its window's tokens. A training example is joined with
its record through that fingerprint (the teacher's output is a function of the window's tokens
only), and every training window is checked to be in the cache before training starts: a cache
built for other data, another ``seq_len`` or another tokenizer is a clear error, never a silent
mismatch.

Writing is resumable and atomic: shards are written into ``OUT.partial/`` (each shard renamed
into place when complete); a rerun of the same command skips finished shards; ``OUT`` appears
only when every shard and the manifest are written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np

from jaxarith import sharding
from jaxarith.data.pipeline import document_segments
from jaxarith.distill import losses as D
from jaxarith.errors import ConfigError, JaxarithError
from jaxarith.io import refs
from jaxarith.io.atomic import check_destination
from jaxarith.io.refs import load_model
from jaxarith.models import transformer

FORMAT = 1
MANIFEST = "manifest.json"
KEYS = "keys.npy"
PLAN = "plan.json"


class CacheError(JaxarithError):
    """A distillation cache is missing, damaged, or built for other data / tokenizer."""


def fingerprint(tokens: np.ndarray) -> int:
    """A 64-bit fingerprint of one token window (int32 bytes)."""
    b = np.ascontiguousarray(np.asarray(tokens, np.int32)).tobytes()
    return int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")


def tokenizer_fingerprint(tokenizer) -> str:
    """A fingerprint of a tokenizer's vocabulary (token -> id) and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    text = json.dumps([vocab, special])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def teacher_config(ref: str):
    """A model reference's config, read without loading its weights."""
    return refs.load_config(ref)


# ----------------------------------------------------------------------------- records


def encode(ids: np.ndarray, logp: np.ndarray, rest: np.ndarray, fp: int) -> bytes:
    """One window's record: ids int32 [T, k], logp float32 [T, k], rest float32 [T], fp."""
    return b"".join([np.asarray(fp, np.uint64).tobytes(),
                     np.ascontiguousarray(ids, np.int32).tobytes(),
                     np.ascontiguousarray(logp, np.float32).tobytes(),
                     np.ascontiguousarray(rest, np.float32).tobytes()])


def decode(record: bytes, seq_len: int, k: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    n = seq_len * k
    want = 8 + 4 * (2 * n + seq_len)
    if len(record) != want:
        raise CacheError(f"a cache record has {len(record)} bytes, expected {want} "
                         f"(seq_len={seq_len}, k={k}): damaged cache")
    fp = int(np.frombuffer(record, np.uint64, 1)[0])
    ids = np.frombuffer(record, np.int32, n, 8).reshape(seq_len, k)
    logp = np.frombuffer(record, np.float32, n, 8 + 4 * n).reshape(seq_len, k)
    rest = np.frombuffer(record, np.float32, seq_len, 8 + 8 * n)
    return fp, ids, logp, rest


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class Cache:
    """An opened cache: its manifest and key table.

    Attributes:
      path: the cache directory.
      manifest: the parsed ``manifest.json``.
      keys: ``[R, 3]`` uint64 (source index, window index, fingerprint) per record.
    """

    path: str
    manifest: dict
    keys: np.ndarray

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    def shard_paths(self) -> list[str]:
        return [os.path.join(self.path, s) for s in self.manifest["shards"]]


def open_cache(path: str) -> Cache:
    """Open a cache directory written by :func:`write_cache` (manifest and keys only)."""
    path = os.path.abspath(os.fspath(path))
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        partial = os.path.isdir(path + ".partial")
        raise CacheError(f"distill.cache {path}: no {MANIFEST} (not a distillation cache"
                         + ("; an unfinished one is in " + path + ".partial: rerun "
                            "`jaxarith distill cache` to finish it)" if partial else ")"))
    with open(mpath) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT}")
    keys = np.load(os.path.join(path, KEYS))
    if keys.shape != (manifest["records"], 3):
        raise CacheError(f"{path}/{KEYS}: shape {keys.shape}, expected "
                         f"({manifest['records']}, 3): damaged cache")
    for s in manifest["shards"]:
        if not os.path.isfile(os.path.join(path, s)):
            raise CacheError(f"distill.cache {path}: shard {s} is missing")
    return Cache(path, manifest, keys)


def check_cache(cache: Cache, sources, tokenizer, seq_len: int) -> dict[int, int]:
    """Check that ``cache`` was built for this data and tokenizer; return fingerprint -> record.

    Every training window of every source with a positive weight must be in the cache.

    Raises:
      CacheError naming what differs (tokenizer, seq_len, a source and window).
    """
    m = cache.manifest
    if m["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise CacheError(f"distill.cache {cache.path} was built with another tokenizer "
                         f"(fingerprint {m['tokenizer']}, this run's "
                         f"{tokenizer_fingerprint(tokenizer)})")
    if m["seq_len"] != seq_len:
        raise CacheError(f"distill.cache {cache.path} was built for seq_len={m['seq_len']}, "
                         f"this run uses data.seq_len={seq_len}")
    # a cache written before packing existed ran the teacher over whole windows: stream
    if m.get("packing", "stream") != packing_of(sources):
        raise CacheError(f"distill.cache {cache.path} was built with data.packing: "
                         f"{m.get('packing', 'stream')}, this run uses "
                         f"{packing_of(sources)}; rebuild it or set data.packing")
    index = {int(fp): i for i, fp in enumerate(cache.keys[:, 2])}
    for s in sources:
        if s.weight <= 0:
            continue
        for w, window in enumerate(s.train):
            if fingerprint(window) not in index:
                raise CacheError(
                    f"distill.cache {cache.path} was built for other data: window {w} of "
                    f"source {s.name!r} ({len(s.train)} windows) is not in it (cache sources: "
                    + ", ".join(f"{x['name']} ({x['windows']} windows)" for x in m["sources"])
                    + ")")
    return index


def packing_of(sources) -> str:
    """``documents`` when the sources' windows are packed documents (the teacher then scores
    each document alone, as the student does), else ``stream``."""
    return "documents" if any(s.documents for s in sources) else "stream"


def _segments(sources, chunk, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and positions of the windows ``tokens`` of ``chunk`` ((source, window)
    pairs), each by its source's EOS (see :func:`jaxarith.data.pipeline.document_segments`)."""
    seg, pos = np.zeros_like(tokens), np.zeros_like(tokens)
    for j, (si, _) in enumerate(chunk):
        seg[j], pos[j] = document_segments(tokens[j], sources[si].eos_id)
    return seg, pos


class Joiner:
    """A grain map function adding ``teacher_ids``, ``teacher_logp`` and ``teacher_rest`` to an
    example ``{"tokens": [T], ...}`` from its cache record (found by the tokens' fingerprint)."""

    def __init__(self, cache: Cache, index: dict[int, int]):
        import grain

        self.cache, self.index = cache, index
        self.source = grain.sources.ArrayRecordDataSource(cache.shard_paths())

    def __call__(self, example: dict) -> dict:
        fp = fingerprint(example["tokens"])
        rec = self.index.get(fp)
        if rec is None:
            raise CacheError(f"distill.cache {self.cache.path}: a training window is not in "
                             "the cache (built for other data)")
        got, ids, logp, rest = decode(self.source[rec], self.cache.seq_len, self.cache.k)
        if got != fp:
            raise CacheError(f"distill.cache {self.cache.path}: record {rec} holds another "
                             "window than its key says: damaged cache")
        return {**example, "teacher_ids": ids.copy(), "teacher_logp": logp.copy(),
                "teacher_rest": rest.copy()}


def join(ds, cache: Cache, sources, tokenizer, seq_len: int):
    """``ds`` (a ``grain.MapDataset`` of examples) with each example's cached teacher fields;
    checks the cache against the data first (:func:`check_cache`)."""
    index = check_cache(cache, sources, tokenizer, seq_len)
    return ds.map(Joiner(cache, index))


# ----------------------------------------------------------------------------- writing


def write_cache(teacher_ref: str, sources, tokenizer, out: str, *, k: int, seq_len: int,
                mesh=None, batch: int = 8, shard_windows: int = 2048, overwrite: bool = False,
                progress: bool = False, dtype: str = "float32") -> dict:
    """Run the teacher over every training window of ``sources`` and write the top-k cache.

    Args:
      teacher_ref: any model reference (HF hub id, HF directory, Orbax directory).
      sources: :class:`jaxarith.data.pipeline.SourceData` of the training data (as a run loads
      them). tokenizer: the run's tokenizer (its fingerprint is stored and checked at training
      time). out: the cache directory (must not exist unless ``overwrite``).
      k: ids kept per position (``<= `` the tokenizer's vocabulary).
      mesh: run the teacher sharded on this mesh (None: one device).
      batch: windows per teacher forward (a multiple of the mesh's data-parallel size).
      shard_windows: windows per ArrayRecord shard (the unit of resumption).
    Returns:
      A summary dict (path, records, shards, k, resumed shards, seconds).
    """
    import time

    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    t0 = time.perf_counter()
    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out) and not overwrite:
        check_destination(out)  # raises: exists
    vocab = len(tokenizer)
    t_cfg = teacher_config(teacher_ref)
    if t_cfg.vocab_size < vocab:
        raise ConfigError(f"teacher {teacher_ref}: vocabulary of {t_cfg.vocab_size} entries, "
                          f"smaller than the tokenizer's {vocab}")
    if not 0 < k <= vocab:
        raise ConfigError(f"--top-k {k}: must be in [1, {vocab}] (the vocabulary size)")
    if seq_len > t_cfg.context_length:
        raise ConfigError(f"seq_len={seq_len} exceeds the teacher's context length "
                          f"{t_cfg.context_length}")
    if mesh is not None:
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        if batch % dp:
            raise ConfigError(f"--batch {batch} is not divisible by the mesh's data-parallel "
                              f"size {dp}")
    windows = [(si, w) for si, s in enumerate(sources) for w in range(len(s.train))]
    n_shards = max(1, -(-len(windows) // shard_windows))
    plan = {"format": FORMAT, "teacher": os.fspath(teacher_ref), "k": k, "seq_len": seq_len,
            "vocab_size": vocab, "tokenizer": tokenizer_fingerprint(tokenizer),
            "sources": [{"name": s.name, "windows": len(s.train),
                         "fingerprint": _source_fingerprint(s.train)} for s in sources],
            "shard_windows": shard_windows, "dtype": dtype, "packing": packing_of(sources)}
    partial = out + ".partial"
    resumed = 0
    if os.path.isdir(partial):
        try:
            with open(os.path.join(partial, PLAN)) as f:
                same = json.load(f) == plan
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(partial)
    os.makedirs(partial, exist_ok=True)
    with open(os.path.join(partial, PLAN), "w") as f:
        json.dump(plan, f)

    params = load_model(teacher_ref, mesh=mesh, dtype=jnp.dtype(dtype), progress=progress).params
    tok_shd = None if mesh is None else \
        sharding.named_sharding(mesh, ("batch", "seq"), (batch, seq_len))

    packed = plan["packing"] == "documents"

    def top(p, tokens, seg, pos):
        extra = {"segment_ids": seg, "positions": pos} if packed else {}
        logits, _, _ = transformer.forward(p, t_cfg, tokens, dtype=jnp.dtype(dtype), **extra)
        return tuple(D.teacher_topk(logits, k, vocab))

    jitted = jax.jit(top)
    from array_record.python.array_record_module import ArrayRecordWriter

    shard_names = [f"teacher-{i:05d}.array_record" for i in range(n_shards)]
    keys = np.zeros((len(windows), 3), np.uint64)
    bar = tqdm(total=len(windows), desc="teacher top-k", unit="win", disable=not progress)
    for i, name in enumerate(shard_names):
        chunk = windows[i * shard_windows:(i + 1) * shard_windows]
        tokens = np.stack([sources[si].train[w] for si, w in chunk]).astype(np.int32)
        segs, poss = _segments(sources, chunk, tokens)
        for j, (si, w) in enumerate(chunk):
            keys[i * shard_windows + j] = (si, w, fingerprint(tokens[j]))
        path = os.path.join(partial, name)
        if os.path.isfile(path):  # finished by an earlier, interrupted invocation
            resumed += 1
            bar.update(len(chunk))
            continue
        writer = ArrayRecordWriter(path + ".tmp", "group_size:1")
        for b0 in range(0, len(chunk), batch):
            rows = tokens[b0:b0 + batch]
            xs = []
            for a in (tokens, segs, poss):
                pad = np.zeros((batch, seq_len), np.int32)
                pad[:len(rows)] = a[b0:b0 + batch]
                xs.append(jnp.asarray(pad) if tok_shd is None else jax.device_put(pad, tok_shd))
            if mesh is not None:
                with jax.set_mesh(mesh):
                    ids, logp, rest = jax.device_get(jitted(params, *xs))
            else:
                ids, logp, rest = jax.device_get(jitted(params, *xs))
            for r in range(len(rows)):
                writer.write(encode(ids[r], logp[r], rest[r], int(keys[i * shard_windows + b0 + r,
                                                                      2])))
            bar.update(len(rows))
        writer.close()
        os.replace(path + ".tmp", path)
    bar.close()
    np.save(os.path.join(partial, KEYS), keys)
    manifest = {**plan, "records": len(windows), "shards": shard_names}
    with open(os.path.join(partial, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    os.remove(os.path.join(partial, PLAN))
    if os.path.lexists(out):  # overwrite: swap the old one out
        old = partial + ".old"
        os.rename(out, old)
        os.rename(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(partial, out)
    return {"path": out, "records": len(windows), "shards": n_shards, "k": k,
            "resumed_shards": resumed, "seconds": round(time.perf_counter() - t0, 2)}


def _source_fingerprint(windows: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(windows, np.int32).tobytes(),
                           digest_size=16).hexdigest()
