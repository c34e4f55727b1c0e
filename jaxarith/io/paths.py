"""Locations that may be URLs: ``gs://bucket/run``, ``s3://...``, ``memory://...`` (any fsspec
filesystem; ``gs://`` needs ``gcsfs``, the ``gcs`` extra) or local paths, behind one small API.

Object stores have no rename and no append, so the safe-output rules (:mod:`jaxarith.io.atomic`)
become:

* a directory a command claims (a training run's ``out``) is refused when it holds objects but
  no :data:`~jaxarith.io.atomic.MARKER`; the marker is written when it is claimed, so a re-run
  finds its own run;
* a complete output (:func:`upload_dir`) is uploaded under a temporary prefix
  ``.NAME.tmp-HOST-PID-XXXX``, copied into place, and its marker is written **last**: a reader
  (and a re-run) treats a destination without the marker as incomplete;
* files written incrementally (metrics.jsonl, TensorBoard events, the loss plot) are written to a
  local staging directory and uploaded whole (:class:`Mirror`), at most every ``interval``
  seconds and when closed.

Orbax checkpoints take the URL as it is (orbax writes ``gs://`` itself).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator

from jaxarith import distributed
from jaxarith.io.atomic import MARKER, OutputExistsError, UnsafeDestinationError, marker_text


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a (non-local) fsspec location such as ``gs://b/x``."""
    s = os.fspath(path)
    return "://" in s and not s.startswith("file://")


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def absolute(path: str) -> str:
    """A URL as it is; a local path made absolute."""
    return os.fspath(path) if is_url(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    if is_url(base):
        return "/".join([os.fspath(base).rstrip("/"), *parts])
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    return fs.exists(p)


def listdir(path: str) -> list[str]:
    """The names directly under ``path`` (empty when it does not exist)."""
    if not is_url(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, p = _fs(path)
    if not fs.isdir(p):
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = _fs(path)
    return fs.isdir(p)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_bytes(path: str) -> bytes:
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = _fs(path)
    return fs.cat_file(p)


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file: locally through a temporary file renamed into place; to an object
    store as one object (objects appear whole)."""
    if not is_url(path):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, p = _fs(path)
    fs.pipe_file(p, data)


def remove(path: str) -> None:
    """Remove one file or object if it exists."""
    if not is_url(path):
        if os.path.exists(path):
            os.remove(path)
        return
    fs, p = _fs(path)
    if fs.exists(p):
        fs.rm(p)


def makedirs(path: str) -> None:
    """A local directory (and its parents); nothing on an object store (no directories)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def write_text(path: str, text: str) -> None:
    """Write a whole UTF-8 text file (see :func:`write_bytes`: it appears whole)."""
    write_bytes(path, text.encode("utf-8"))


def claim_dir(url: str, *, kind: str, accept: Iterable[str] = ()) -> str:
    """:func:`jaxarith.io.atomic.claim_dir` for a URL: a new or empty location, or one holding the
    marker (a re-run), or one holding an ``accept`` name; anything else is refused. Only the
    primary process claims it in a multi-process run."""
    def claim() -> str:
        names = listdir(url)
        if names and MARKER not in names and not set(accept) & set(names):
            raise UnsafeDestinationError(
                f"{url} cannot hold a {kind}: it was not written by jaxarith (no {MARKER}) and "
                "is not empty; choose another location")
        if MARKER not in names:
            write_text(join(url, MARKER), marker_text(kind))
        return url

    if distributed.process_count() > 1:
        return distributed.on_primary(claim, f"claim {url}")
    return claim()


def check_upload(url: str, overwrite: bool = False) -> list[str]:
    """Refuse a destination :func:`upload_dir` may not write (before any work): one holding
    objects but no marker, or an earlier output without ``overwrite``. Returns its names."""
    names = listdir(url)
    if names and MARKER not in names:
        raise UnsafeDestinationError(f"{url} is not empty and was not written by jaxarith (no "
                                     f"{MARKER}); nothing was written")
    if names and not overwrite:
        raise OutputExistsError(f"{url} already exists (a jaxarith output); pass overwrite to "
                                "replace it")
    return names


def upload_dir(local: str, url: str, *, kind: str = "output", overwrite: bool = False) -> str:
    """Put a complete local output directory at ``url`` by the object-store rules: upload under
    a temporary sibling prefix, copy into place, remove the temporary, write the marker last.
    A destination holding objects but no marker is refused (nothing is deleted); one holding
    the marker is replaced (with ``overwrite``) only after the new files are uploaded."""
    names = check_upload(url, overwrite)
    fs, dst = _fs(url)
    parent, name = posixpath.split(dst.rstrip("/"))
    tmp = posixpath.join(parent, f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-"
                                 f"{secrets.token_hex(2)}")
    files = [os.path.relpath(os.path.join(d, f), local)
             for d, _, fs_ in os.walk(local) for f in fs_ if f != MARKER]
    try:
        for rel in files:
            fs.put_file(os.path.join(local, rel), posixpath.join(tmp, rel.replace(os.sep, "/")))
        if names:  # an earlier output of ours: its marker goes first, so it reads incomplete
            fs.rm(posixpath.join(dst, MARKER))
            fs.rm(dst, recursive=True)
        for rel in files:
            rel = rel.replace(os.sep, "/")
            fs.copy(posixpath.join(tmp, rel), posixpath.join(dst, rel))
    finally:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
    write_text(join(url, MARKER), marker_text(kind))
    return url


@contextlib.contextmanager
def staged_output(dst: str | os.PathLike, *, kind: str = "output",
                  overwrite: bool = False) -> Iterator[str]:
    """Where a command writes its output directory ``dst``.

    A local path is yielded as it is (the writers' own atomic rules apply). For a URL the
    destination is checked first (:func:`check_upload`: refused before any work), a fresh local
    directory is yielded, and when the block ends without an error it is uploaded by
    :func:`upload_dir` (temporary prefix, marker last) from the primary process; on an error
    nothing is uploaded and the staging directory is removed. The output is staged whole on
    local disk (``TMPDIR``), so that disk needs room for it.
    """
    if not is_url(dst):
        yield os.fspath(dst)
        return
    dst = os.fspath(dst)
    check_upload(dst, overwrite)
    with tempfile.TemporaryDirectory(prefix="jaxarith_stage_") as tmp:
        local = os.path.join(tmp, "out")
        yield local
        if distributed.is_primary():
            upload_dir(local, dst, kind=kind, overwrite=overwrite)


class Mirror:
    """A local directory whose files are uploaded to ``url`` (for files written with ordinary
    file APIs and grown in place: metrics.jsonl, TensorBoard events, a plot). For a local path
    the directory is the path itself and :meth:`push` does nothing.

    Args:
      url: the location (URL or local path).
      pull: names under ``url`` to download first (what a resumed run continues).
      interval: :meth:`push` uploads at most every this many seconds unless forced.
    """

    def __init__(self, url: str, *, pull: Iterable[str] = (), interval: float = 30.0):
        self.url, self.interval = url, interval
        self.remote = is_url(url)
        self._sent: dict[str, tuple[int, int]] = {}
        self._last = 0.0
        if not self.remote:
            self.local = url
            return
        self.local = tempfile.mkdtemp(prefix="jaxarith-mirror-")
        fs, p = _fs(url)
        for name in pull:
            src = posixpath.join(p, name)
            if fs.isdir(src):
                fs.get(src, os.path.join(self.local, name), recursive=True)
            elif fs.exists(src):
                fs.get_file(src, os.path.join(self.local, name))
        self._sent = self._state()

    def _state(self) -> dict[str, tuple[int, int]]:
        out = {}
        for d, _, files in os.walk(self.local):
            for f in files:
                full = os.path.join(d, f)
                st = os.stat(full)
                out[os.path.relpath(full, self.local)] = (st.st_size, st.st_mtime_ns)
        return out

    def push(self, force: bool = False) -> None:
        """Upload the files that changed since the last push."""
        if not self.remote or (not force and time.monotonic() - self._last < self.interval):
            return
        fs, p = _fs(self.url)
        now = self._state()
        for rel, sig in now.items():
            if self._sent.get(rel) != sig:
                fs.put_file(os.path.join(self.local, rel),
                            posixpath.join(p, rel.replace(os.sep, "/")))
        self._sent, self._last = now, time.monotonic()

    def close(self) -> None:
        """Upload what is left and remove the staging directory."""
        if self.remote:
            self.push(force=True)
            shutil.rmtree(self.local, ignore_errors=True)
