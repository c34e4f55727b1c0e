"""Multi-process runs: the one way every jaxarith program joins a ``jax.distributed`` cluster.

A pod (or a GPU cluster) runs one JAX process per host; every process runs the *same* command.
Two ways to say how the processes find each other, shared by ``python -m train`` and every
``jaxarith`` subcommand (the flags are added to each parser by :func:`add_arguments`):

* ``--distributed`` (train config ``distributed: true``): ``jax.distributed.initialize()``
  detects the cluster itself (Cloud TPU VM slices, SLURM, Open MPI, ...);
* ``--coordinator HOST:PORT --num-processes N --process-id I [--init-timeout S]`` (or the
  environment variables ``JAXARITH_COORDINATOR``, ``JAXARITH_NUM_PROCESSES``,
  ``JAXARITH_PROCESS_ID``, ``JAXARITH_INIT_TIMEOUT``): explicit, works anywhere, CPU included
  (two processes on one laptop: ``--coordinator 127.0.0.1:12345 --num-processes 2
  --process-id 0`` and ``... --process-id 1``).

:func:`initialize` runs before any other JAX call (it must: JAX fixes its devices at the first
one). CPU collectives go through gloo. Process 0 is the *primary*: it alone writes logs,
progress bars, metrics files, plots, HF exports and the JSON on stdout (:func:`quiet_secondary`);
errors are reported by every process. The helpers below (:func:`barrier`,
:func:`broadcast_str`, :func:`to_host`) are the only collectives outside the jitted programs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from jaxarith.errors import ConfigError, JaxarithError

ENV_COORDINATOR = "JAXARITH_COORDINATOR"
ENV_NUM_PROCESSES = "JAXARITH_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXARITH_PROCESS_ID"
ENV_INIT_TIMEOUT = "JAXARITH_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "JAXARITH_HEARTBEAT_TIMEOUT"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """How this process joins a cluster.

    Attributes:
      auto: let ``jax.distributed.initialize()`` detect the cluster (TPU pod, SLURM, ...).
      coordinator: ``HOST:PORT`` of process 0's coordination service (explicit mode).
      num_processes: processes in the run (explicit mode).
      process_id: this process's index in ``[0, num_processes)`` (explicit mode).
      init_timeout: seconds to wait for every process to connect.
      heartbeat_timeout: seconds after which a silent (dead) process fails the others.
    """

    auto: bool = False
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout: int = 300
    heartbeat_timeout: int = 100

    def __post_init__(self):
        explicit = (self.coordinator, self.num_processes, self.process_id)
        if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
            missing = [f for f, v in zip(("--coordinator", "--num-processes", "--process-id"),
                                         explicit, strict=True) if v is None]
            raise ConfigError(f"multi-process run: {', '.join(missing)} missing (give "
                              "--coordinator HOST:PORT, --num-processes N and --process-id I "
                              "together, or --distributed to auto-detect a cluster)")
        if self.coordinator is not None:
            host, _, port = self.coordinator.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"--coordinator {self.coordinator!r}: expected HOST:PORT")
            if self.num_processes < 1:
                raise ConfigError(f"--num-processes {self.num_processes}: must be at least 1")
            if not 0 <= self.process_id < self.num_processes:
                raise ConfigError(f"--process-id {self.process_id}: must be in [0, "
                                  f"{self.num_processes}) for --num-processes "
                                  f"{self.num_processes}")
        for name in ("init_timeout", "heartbeat_timeout"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be "
                                  "at least 1 second")

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator is not None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the multi-process flags (defaults from the ``JAXARITH_*`` environment) to ``p``."""
    env = os.environ.get
    g = p.add_argument_group("multi-process (one process per host; every process runs the same "
                             "command)")
    g.add_argument("--distributed", action="store_true",
                   help="join the cluster jax.distributed detects (Cloud TPU slice, SLURM, ...)")
    g.add_argument("--coordinator", metavar="HOST:PORT", default=env(ENV_COORDINATOR),
                   help=f"process 0's address (env {ENV_COORDINATOR})")
    g.add_argument("--num-processes", metavar="N", type=int,
                   default=_env_int(ENV_NUM_PROCESSES),
                   help=f"number of processes (env {ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", metavar="I", type=int, default=_env_int(ENV_PROCESS_ID),
                   help=f"this process's index, 0 .. N-1 (env {ENV_PROCESS_ID})")
    g.add_argument("--init-timeout", metavar="S", type=int,
                   default=_env_int(ENV_INIT_TIMEOUT) or 300,
                   help=f"seconds to wait for all processes to connect (default 300; env "
                        f"{ENV_INIT_TIMEOUT})")
    g.add_argument("--heartbeat-timeout", metavar="S", type=int,
                   default=_env_int(ENV_HEARTBEAT_TIMEOUT) or 100,
                   help=f"seconds after which a dead process fails the others (default 100; env "
                        f"{ENV_HEARTBEAT_TIMEOUT})")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment {name}={value!r}: expected an integer") from None


def config_from_args(args: Any, *, auto: bool = False) -> ClusterConfig:
    """The :class:`ClusterConfig` of parsed :func:`add_arguments` flags (``auto``: also when a
    config file asks for ``distributed: true``)."""
    return ClusterConfig(auto=auto or bool(getattr(args, "distributed", False)),
                         coordinator=getattr(args, "coordinator", None),
                         num_processes=getattr(args, "num_processes", None),
                         process_id=getattr(args, "process_id", None),
                         init_timeout=getattr(args, "init_timeout", None) or 300,
                         heartbeat_timeout=getattr(args, "heartbeat_timeout", None) or 100)


def config_from_env() -> ClusterConfig:
    """The :class:`ClusterConfig` the ``JAXARITH_*`` environment variables give (for scripts
    that call the library directly: ``initialize(config_from_env())``)."""
    return ClusterConfig(coordinator=os.environ.get(ENV_COORDINATOR) or None,
                         num_processes=_env_int(ENV_NUM_PROCESSES),
                         process_id=_env_int(ENV_PROCESS_ID),
                         init_timeout=_env_int(ENV_INIT_TIMEOUT) or 300,
                         heartbeat_timeout=_env_int(ENV_HEARTBEAT_TIMEOUT) or 100)


_STATE: dict[str, Any] = {"cluster": None}


def initialize(cluster: ClusterConfig) -> bool:
    """Join the cluster (once per process; later calls with the same settings do nothing).

    Must run before any other JAX call. Returns True when this process is part of a
    multi-process run.

    Raises:
      ConfigError: no cluster could be detected / reached, or conflicting settings.
    """
    if not cluster.enabled:
        return False
    if _STATE["cluster"] is not None:
        return True
    import jax

    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {"initialization_timeout": cluster.init_timeout,
                              "heartbeat_timeout_seconds": cluster.heartbeat_timeout}
    if cluster.coordinator is not None:
        kwargs.update(coordinator_address=cluster.coordinator,
                      num_processes=cluster.num_processes, process_id=cluster.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if cluster.coordinator is None:
            raise ConfigError(f"distributed: true but no multi-host cluster was found ({first}); "
                              "on one machine run with distributed=false (or without "
                              "--distributed), or "
                              "start the processes with --coordinator HOST:PORT "
                              "--num-processes N --process-id I") from None
        raise ConfigError(f"process {cluster.process_id} of {cluster.num_processes} could not "
                          f"join the coordinator {cluster.coordinator} within "
                          f"{cluster.init_timeout} s ({first})") from None
    _STATE["cluster"] = cluster
    _native_stdout_to_devnull()
    return True


def _native_stdout_to_devnull() -> None:
    """Drop what native code prints on file descriptor 1 (gloo's "[Gloo] Rank 0 is connected
    to 3 peer ranks" lines, at every new communicator); Python's ``sys.stdout`` keeps the real
    stdout, so ``--json`` still prints exactly one object there."""
    try:
        sys.stdout.flush()
        real = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except (OSError, AttributeError, ValueError):  # no real file descriptors (captured output)
        return
    sys.stdout = os.fdopen(real, "w", buffering=1, encoding=sys.stdout.encoding or "utf-8",
                           closefd=True)


def setup_from_args(args: Any) -> bool:
    """:func:`initialize` from parsed flags, then :func:`quiet_secondary` (what
    ``jaxarith.commands._common.run`` does before every subcommand)."""
    joined = initialize(config_from_args(args))
    if joined:
        quiet_secondary()
    return joined


def is_initialized() -> bool:
    return _STATE["cluster"] is not None


def process_index() -> int:
    """This process's index (0 without a cluster; never initialises JAX's backend)."""
    if not is_initialized():
        return 0
    import jax

    return jax.process_index()


def process_count() -> int:
    """The number of processes (1 without a cluster; never initialises JAX's backend)."""
    if not is_initialized():
        return 1
    import jax

    return jax.process_count()


def is_primary() -> bool:
    """True in process 0 (the one that writes logs, stdout JSON and shared files)."""
    return process_index() == 0


def quiet_secondary() -> None:
    """In processes other than 0: stdout goes nowhere, logging only shows errors, warnings are
    silenced (errors still reach stderr, prefixed by the process index)."""
    if is_primary():
        return
    devnull = open(os.devnull, "w")  # noqa: SIM115 (kept open for the life of the process)
    sys.stdout = devnull
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


def error_prefix() -> str:
    """``"[process I/N] "`` in a multi-process run (so an error names its process), else ``""``."""
    if not is_initialized():
        return ""
    return f"[process {process_index()}/{process_count()}] "


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op with one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_str(value: str | None, max_len: int = 8192) -> str:
    """Process 0's ``value`` in every process (e.g. a temporary directory name it chose)."""
    if process_count() == 1:
        return value or ""
    from jax.experimental import multihost_utils

    buf = np.zeros(max_len, np.uint8)
    if is_primary():
        raw = (value or "").encode()
        if len(raw) > max_len:
            raise ConfigError(f"broadcast_str: {len(raw)} bytes exceed {max_len}")
        buf[: len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(out[out != 0].astype(np.uint8)).decode()


def on_primary(fn: Callable[[], str | None], what: str) -> str:
    """Run ``fn`` on process 0 only and return its result (a string) on every process.

    Shared-file work (create a directory, rename an output into place) happens once; an error
    there is raised on every process (other processes raise a :class:`JaxarithError` with the
    same message), so none waits forever for process 0.
    """
    if process_count() == 1:
        return fn() or ""
    result, error = "", None
    if is_primary():
        try:
            result = "ok:" + (fn() or "")
        except Exception as e:  # re-raised below, after the others have heard of it
            error = e
            result = f"error:{type(e).__name__}: {e}"
    shared = broadcast_str(result)
    if error is not None:
        raise error
    if shared.startswith("error:"):
        raise JaxarithError(f"process 0 failed to {what}: {shared[len('error:'):]}")
    return shared[len("ok:"):]


@contextlib.contextmanager
def shared_tempdir(*, prefix: str, dir: str) -> Iterator[str]:
    """A temporary directory under ``dir`` (which every process sees) for intermediate files of
    a multi-process run: process 0 creates it and every process gets its name; process 0
    removes it at the end (after a barrier on success; at once on an error). With one process,
    a plain ``tempfile.TemporaryDirectory``."""
    import shutil
    import tempfile

    if process_count() == 1:
        with tempfile.TemporaryDirectory(prefix=prefix, dir=dir) as tmp:
            yield tmp
        return
    tmp = on_primary(lambda: tempfile.mkdtemp(prefix=prefix, dir=dir),
                     f"create a temporary directory in {dir}")
    try:
        yield tmp
        barrier(f"jaxarith shared_tempdir done {tmp}")
    finally:
        if is_primary():
            shutil.rmtree(tmp, ignore_errors=True)


GATHER_CHUNK_BYTES = 64 << 20  # a tensor is gathered in row blocks of about this size


def to_host(x) -> np.ndarray:
    """The whole value of an array on the host of every process.

    A fully addressable array (one process) is copied with ``device_get``. An array spread over
    processes is gathered in blocks of rows (about :data:`GATHER_CHUNK_BYTES` each): every
    process receives each block once, split over its own devices, and copies it into one host
    buffer, so the transient memory of the collective stays near one block, not a multiple of
    the tensor. A collective: every process must call it, in the same order. Callers gather one
    tensor (or one layer of a stacked tensor) at a time.
    """
    import jax

    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    shape = tuple(x.shape)
    split = _partitioned_dims(x.sharding, len(shape))
    # blocks along a dimension the source does not split (slicing it moves no data)
    axis = next((i for i in range(len(shape)) if i not in split and shape[i] > 1), 0)
    if not shape or shape[axis] <= 1:
        rows = shape[axis] if shape else 0
    else:
        row_bytes = max(1, x.dtype.itemsize * int(np.prod(shape, dtype=np.int64)) // shape[axis])
        rows = int(min(shape[axis], max(1, GATHER_CHUNK_BYTES // row_bytes)))
    gather = _gather_fn(x.sharding, shape, axis, rows)
    if gather is None:  # not on every device: jax's own gather (replicated on every device)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    out = np.empty(shape, x.dtype)
    if not shape:
        return np.asarray(gather(x, 0).addressable_data(0)).reshape(())
    for start in range(0, shape[axis], rows):
        first = min(start, shape[axis] - rows)  # the last block ends at the last row
        block = gather(x, first)
        for shard in block.addressable_shards:
            index = list(shard.index)
            lo, hi, _ = index[axis].indices(rows)
            index[axis] = slice(first + lo, first + hi)
            out[tuple(index)] = np.asarray(shard.data)
    return out


def _partitioned_dims(sharding, ndim: int) -> set[int]:
    """The dimensions a NamedSharding splits (empty for other shardings)."""
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return set()
    return {i for i, s in enumerate(tuple(spec)[:ndim]) if s is not None}


@functools.lru_cache(maxsize=64)
def _gather_fn(src_sharding, shape: tuple[int, ...], axis: int, rows: int):
    """A jitted ``(array, start) -> the block of `rows` along `axis` from start``, resharded to
    "whole in each process, split over its devices" along a dimension the source splits (so
    the reshard gathers and never replicates the whole input); None when the source is not on
    every device."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if set(src_sharding.device_set) != set(devices):
        return None
    local = jax.local_device_count()
    mesh = Mesh(np.asarray(devices).reshape(jax.process_count(), local),
                ("processes", "local"))
    block = list(shape)
    if shape:
        block[axis] = rows
    split = _partitioned_dims(src_sharding, len(shape))
    candidates = sorted(range(len(block)), key=lambda i: (i not in split, i))
    dim = next((i for i in candidates if block[i] % local == 0), None)
    spec = PartitionSpec() if dim is None else PartitionSpec(*([None] * dim), "local")

    def take(a, start):
        return a if not shape else jax.lax.dynamic_slice_in_dim(a, start, rows, axis=axis)

    return jax.jit(take, out_shardings=NamedSharding(mesh, spec))
