"""Safe outputs: every directory jaxarith writes goes through this module.

The rules (one place, used by convert, merge, delta, training exports and run directories):

- An output is written into a temporary sibling ``.NAME.tmp-HOST-PID-XXXX`` and renamed into
  place only when complete; on any error, Ctrl-C or SIGTERM the temporary is removed.
- Every output holds a marker file, :data:`MARKER` (``.jaxarith-output.json``: what wrote it,
  when, with which command).
- ``overwrite=True`` replaces only a destination holding that marker, or an empty directory;
  never the current directory (or a parent of it), ``$HOME`` (or a parent of it), ``/``, an
  input, or a directory holding an input. Anything else is refused before work starts. The old
  destination is removed only after the new one is complete.
- Before writing, temporary siblings left by a process that is gone (same host) are removed and
  reported on stderr.
- Outputs get the permissions the user's umask gives any new directory.

Inputs are passed explicitly (``atomic_dir(dst, inputs=[...])``) or declared once for a whole
command with :func:`protect_inputs`, which every nested ``atomic_dir`` / ``check_destination``
call honours (so library writers need not thread the inputs through).

Directories that are written incrementally rather than atomically (training runs, experiment
directories) are claimed with :func:`claim_dir`, which creates or re-uses them and adds the marker.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterable, Iterator

from jaxarith import __version__, distributed
from jaxarith.errors import JaxarithError, Terminated

MARKER = ".jaxarith-output.json"

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]+$")
_INPUTS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("jaxarith_inputs",
                                                                          default=())

PathLike = str | os.PathLike


class OutputExistsError(JaxarithError, FileExistsError):
    """The destination exists and ``overwrite`` was not given."""


class UnsafeDestinationError(OutputExistsError):
    """``overwrite`` was given for a destination jaxarith must never replace."""


def _real(path: PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _is_within(child: str, parent: str) -> bool:
    """Whether real path ``child`` is ``parent`` or below it."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _hostname() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


@contextlib.contextmanager
def protect_inputs(inputs: Iterable[PathLike | None]) -> Iterator[None]:
    """Declare a command's inputs: no nested output may replace them or a directory holding them.

    Entries that are not local paths (hub ids, None) are ignored.
    """
    token = _INPUTS.set(_INPUTS.get() + tuple(os.fspath(i) for i in inputs if i))
    try:
        yield
    finally:
        _INPUTS.reset(token)


def _local_inputs(inputs: Iterable[PathLike | None]) -> list[str]:
    out = []
    for i in [*(inputs or ()), *_INPUTS.get()]:
        if i and os.path.exists(os.path.expanduser(os.fspath(i))):
            out.append(_real(i))
    return out


def is_output(path: PathLike) -> bool:
    """Whether ``path`` is a directory that jaxarith wrote (it holds :data:`MARKER`)."""
    return os.path.isfile(os.path.join(os.fspath(path), MARKER))


def marker_text(kind: str = "output", **info) -> str:
    """The content of :data:`MARKER`: what wrote the output, when, how."""
    record = {"written_by": f"jaxarith {__version__}", "kind": kind,
              "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": sys.argv, "host": socket.gethostname(), "pid": os.getpid(), **info}
    return json.dumps(record, indent=1, default=str) + "\n"


def write_marker(directory: PathLike, kind: str = "output", **info) -> str:
    """Write :data:`MARKER` into ``directory`` (what wrote it, when, how). Returns its path."""
    path = os.path.join(os.fspath(directory), MARKER)
    with open(path, "w") as f:
        f.write(marker_text(kind, **info))
    return path


def _is_model_dir(path: str) -> bool:
    """Whether ``path`` holds a model (an HF checkpoint or a jaxarith Orbax checkpoint)."""
    has = lambda n: os.path.exists(os.path.join(path, n))
    return has("jaxarith.json") or (has("config.json") and (
        has("model.safetensors") or has("model.safetensors.index.json")))


def _why_inside_input(dst: str, inputs: list[str]) -> str | None:
    """Why ``dst`` (a real path, existing or not) may not be written inside an input model."""
    for i in inputs:
        if dst != i and _is_within(dst, i) and os.path.isdir(i) and _is_model_dir(i):
            return f"it is inside the input model directory {i}"
    return None


def _remove(path: str) -> bool:
    """Remove a directory tree, or just the link when ``path`` is a symbolic link (``rmtree``
    refuses links). Returns whether ``path`` is gone."""
    if os.path.islink(path) or os.path.isfile(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


def _why_unsafe(dst: str, inputs: list[str]) -> str | None:
    """Why ``dst`` (a real path) must never be replaced, or None."""
    if dst == os.sep:
        return "it is the root directory"
    if _is_within(_real(os.getcwd()), dst):
        return "it is the current directory" if _real(os.getcwd()) == dst else \
            "it holds the current directory"
    home = _real("~")
    if _is_within(home, dst):
        return "it is your home directory" if home == dst else "it holds your home directory"
    for i in inputs:
        if i == dst:
            return f"it is an input of this command ({i})"
        if _is_within(i, dst):
            return f"it holds an input of this command ({i})"
    return None


def check_destination(dst: PathLike, overwrite: bool = False, *,
                      inputs: Iterable[PathLike | None] = ()) -> str:
    """Refuse a destination that may not be written, before any work starts.

    Args:
      dst: the output directory.
      overwrite: allow replacing an existing ``dst`` that jaxarith wrote, or an empty directory.
      inputs: the command's inputs (paths; hub ids are ignored), never to be replaced.
    Returns:
      ``dst`` as an absolute path (its parent is created); for an existing symbolic link, the
      directory it points to (the output is written through the link).
    Raises:
      OutputExistsError: ``dst`` exists and ``overwrite`` is False.
      UnsafeDestinationError: ``dst`` exists and may not be replaced even with ``overwrite``.
      JaxarithError: the parent directory is not writable.
    """
    dst = os.path.abspath(os.path.expanduser(os.fspath(dst)))
    inside = _why_inside_input(_real(dst), _local_inputs(inputs))
    if inside is not None:
        raise UnsafeDestinationError(f"{dst} cannot be written: {inside}; choose an output "
                                     "directory outside it")
    if os.path.lexists(dst):
        real = _real(dst)
        why = _why_unsafe(real, _local_inputs(inputs))
        if why is None and not os.path.isdir(dst):
            why = "it is not a directory"
        if why is None and not is_output(dst) and os.listdir(dst):
            why = f"it was not written by jaxarith (no {MARKER}) and is not empty"
        if why is not None:
            raise UnsafeDestinationError(
                f"{dst} already exists and will not be replaced: {why}; choose another output "
                f"directory" + (" (even --overwrite never replaces it)" if overwrite else ""))
        if not overwrite:
            raise OutputExistsError(f"{dst} already exists (pass --overwrite to replace it)")
        if os.path.islink(dst):  # replace what the link points to; the link stays
            dst = real
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise JaxarithError(f"cannot write to {parent}: permission denied")
    return dst


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def clean_stale(dst: PathLike) -> list[str]:
    """Remove temporary siblings of ``dst`` left by processes of this host that are gone.

    A left-over ``.old`` sibling (the previous output, moved aside while being replaced) is
    removed only when ``dst`` exists; otherwise it is reported and kept.

    Returns:
      the paths removed (each also reported on stderr).
    """
    dst = os.path.abspath(os.fspath(dst))
    parent, name = os.path.split(dst)
    host, removed = _hostname(), []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        m = _TMP_RE.match(entry)
        if not m or m["name"] != name or m["host"] != host or int(m["pid"]) == os.getpid():
            continue
        if not _process_gone(int(m["pid"])):
            continue
        path = os.path.join(parent, entry)
        if m["what"] == "old" and not os.path.lexists(dst):
            print(f"jaxarith: {path} holds the previous {dst} (its replacement was "
                  "interrupted); rename it back to keep it", file=sys.stderr)
            continue
        if not _remove(path):
            print(f"jaxarith: could not remove {path} (left by process {m['pid']}, which is "
                  "gone); remove it by hand", file=sys.stderr)
            continue
        removed.append(path)
        print(f"jaxarith: removed {path} (left by process {m['pid']}, which is gone)",
              file=sys.stderr)
    return removed


def _sibling(dst: str, what: str) -> str:
    parent, name = os.path.split(dst)
    while True:
        path = os.path.join(parent, f".{name}.{what}-{_hostname()}-{os.getpid()}-"
                                    f"{secrets.token_hex(4)}")
        if not os.path.lexists(path):
            return path


def _raise_terminated(signum, frame) -> None:
    del frame
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`~jaxarith.errors.Terminated` (like Ctrl-C raises
    KeyboardInterrupt) so ``finally``/cleanup code runs. Only in the main thread, and only when
    SIGTERM still has its default handler (a training loop's own handler is left alone)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_dir(dst: PathLike, *, overwrite: bool = False,
               inputs: Iterable[PathLike | None] = (), kind: str = "output",
               info: dict | None = None) -> Iterator[str]:
    """Yield a temporary directory next to ``dst``; on success it becomes ``dst``.

    The destination is checked first (:func:`check_destination`); stale temporaries of dead
    processes are removed (:func:`clean_stale`); the marker file is written into the output.
    On any exception (also Ctrl-C and SIGTERM) the temporary directory is removed and ``dst`` is
    left as it was. An existing ``dst`` is removed only after the new output is complete.

    Args:
      dst: the output directory.
      overwrite: replace an existing ``dst`` that jaxarith wrote (or an empty directory).
      inputs: the command's input paths (also those declared with :func:`protect_inputs`).
      kind: what the output is ("hf", "orbax", "merge", ...), recorded in the marker.
      info: more facts for the marker (JSON-serialisable).

    Example::

        with atomic_dir("out/model", overwrite=args.overwrite, inputs=[args.src]) as tmp:
            write_files(tmp)
    """
    if distributed.process_count() > 1:
        with _shared_atomic_dir(dst, overwrite=overwrite, inputs=inputs, kind=kind,
                                info=info) as tmp:
            yield tmp
        return
    dst = check_destination(dst, overwrite, inputs=inputs)
    clean_stale(dst)
    tmp = _sibling(dst, "tmp")
    os.mkdir(tmp)  # mode 0o777 minus the umask, like any new directory (mkdtemp gives 0700)
    try:
        with terminate_as_exception():
            yield tmp
            _commit(tmp, dst, overwrite, inputs, kind, info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: str, dst: str, overwrite: bool, inputs, kind: str, info: dict | None) -> str:
    """Mark the complete temporary ``tmp`` and rename it to ``dst`` (the old one removed)."""
    write_marker(tmp, kind, **(info or {}))
    if os.path.lexists(dst):
        # re-check: dst may have changed while we worked
        check_destination(dst, overwrite, inputs=inputs)
        old = _sibling(dst, "old")
        os.rename(dst, old)
        os.rename(tmp, dst)
        _remove(old)
    else:
        os.rename(tmp, dst)
    return dst


@contextlib.contextmanager
def _shared_atomic_dir(dst: PathLike, *, overwrite: bool, inputs, kind: str,
                       info: dict | None) -> Iterator[str]:
    """:func:`atomic_dir` of a multi-process run: one temporary for all processes.

    Process 0 checks the destination and creates the temporary; every process gets its name and
    writes its part (an Orbax save writes each process's shards; an HF export writes from
    process 0 only); after a barrier process 0 commits it. The destination must be on storage
    every process sees (a shared file system or a bucket). An error on process 0 is raised on
    every process.
    """
    def prepare() -> str:
        d = check_destination(dst, overwrite, inputs=inputs)
        clean_stale(d)
        tmp = _sibling(d, "tmp")
        os.mkdir(tmp)
        return tmp

    tmp = distributed.on_primary(prepare, f"prepare {os.fspath(dst)}")
    real_dst = os.path.abspath(os.path.expanduser(os.fspath(dst)))  # as check_destination
    if os.path.islink(real_dst):
        real_dst = _real(real_dst)
    try:
        with terminate_as_exception():
            yield tmp
            distributed.barrier(f"jaxarith atomic_dir written {tmp}")
            distributed.on_primary(
                lambda: _commit(tmp, real_dst, overwrite, inputs, kind, info),
                f"commit {real_dst}")
    except BaseException:
        if distributed.is_primary():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def claim_dir(directory: PathLike, *, kind: str, inputs: Iterable[PathLike | None] = (),
              accept: Iterable[str] = (), info: dict | None = None) -> str:
    """Create or re-use a directory written incrementally (a training run, an experiment).

    A new or empty directory gets the marker; a directory that already holds it is re-used
    (resume). A non-empty directory without the marker is refused, unless it holds one of the
    ``accept`` names (what an older jaxarith wrote there, e.g. ``metrics.jsonl``): it then gets
    the marker. Never the current directory, ``$HOME``, ``/`` or a directory holding an input.

    Args:
      directory: the directory to claim.
      kind: what it holds ("training run", "experiment", ...), recorded in the marker.
      inputs: the command's input paths.
      accept: names whose presence identifies an unmarked directory as jaxarith's own.
      info: more facts for the marker.
    Returns:
      the absolute path of the directory.
    Raises:
      UnsafeDestinationError: the directory may not be used.
    """
    if distributed.process_count() > 1:  # one process claims it for all
        return distributed.on_primary(
            lambda: _claim(directory, kind=kind, inputs=inputs, accept=accept, info=info),
            f"claim {os.fspath(directory)}")
    return _claim(directory, kind=kind, inputs=inputs, accept=accept, info=info)


def _claim(directory: PathLike, *, kind: str, inputs: Iterable[PathLike | None],
           accept: Iterable[str], info: dict | None) -> str:
    path = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    inside = _why_inside_input(_real(path), _local_inputs(inputs))
    if inside is not None:
        raise UnsafeDestinationError(f"{path} cannot hold a {kind}: {inside}; choose another "
                                     "directory")
    if os.path.lexists(path) and not is_output(path):
        why = _why_unsafe(_real(path), _local_inputs(inputs))
        if why is None and not os.path.isdir(path):
            why = "it is not a directory"
        if why is None and os.listdir(path) and \
                not any(os.path.lexists(os.path.join(path, a)) for a in accept):
            why = f"it was not written by jaxarith (no {MARKER}) and is not empty"
        if why is not None:
            raise UnsafeDestinationError(f"{path} cannot hold a {kind}: {why}; choose another "
                                         "directory")
    os.makedirs(path, exist_ok=True)
    if not is_output(path):
        write_marker(path, kind, **(info or {}))
    return path


def replace_dir(directory: PathLike, *, kind: str, inputs: Iterable[PathLike | None] = ()) -> str:
    """Empty a claimed directory to start it over (``--overwrite`` of a run/experiment).

    Only a directory holding the marker (or an empty one) is removed, by the same rules as
    :func:`check_destination` with ``overwrite=True``; it is then claimed afresh.

    Returns:
      the absolute path of the (new, empty, marked) directory.
    """
    path = check_destination(directory, True, inputs=inputs)
    if os.path.lexists(path):
        old = _sibling(path, "old")
        os.rename(path, old)
        _remove(old)
    return claim_dir(path, kind=kind, inputs=inputs)
