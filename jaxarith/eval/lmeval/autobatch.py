"""``batch_size="auto"``: the most packed scoring rows per call that fit the device memory.

lm-eval's ``hf`` backend finds its batch by trial: it runs ``max_batch_size`` rows of the longest
request and halves on an out-of-memory error. XLA can say what a program needs before it runs:
the compiled program's ``memory_analysis()`` (temporary, output and argument bytes, per device).
:func:`choose` compiles the scorer (:func:`jaxarith.eval.lmeval.scoring._score_packed`) at its
largest shape (rows of ``T`` slots, ``T`` scored positions) for ``dp`` and ``2 dp`` rows (``dp``:
the mesh's data-parallel size), fits bytes = fixed + per_row * rows, takes the largest multiple of
``dp`` up to the cap that the fit puts within the budget, then compiles that batch and halves
until its exact figure fits. Never below ``dp`` rows (one row per data shard): a batch that fits
one row is never refused.

The budget, per device:

- **a device that reports its memory** (GPU, TPU: ``memory_stats()["bytes_limit"]``): 90% of
  what is free (``bytes_limit - bytes_in_use``, the loaded parameters already counted), the
  smallest over the mesh's devices;
- **CPU** (no limit reported): half of the host's available physical memory
  (``SC_AVPHYS_PAGES``) shared by the process's devices, and the cap is
  :data:`CPU_MAX_BATCH` rows unless ``max_batch_size`` says otherwise (a CPU reports no limit,
  so the cap bounds the batch: 16 rows of 256+ tokens are 4096+ tokens per call).

The parameters are counted once: their argument bytes are subtracted, they are resident already.
Generation uses the same rows without a measurement of its own; an out-of-memory error at run
time halves the batch (``JaxarithLM._shrink_batch``, one process only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxarith import sharding
from jaxarith.decode.loop import DecodeSpec, member_weights
from jaxarith.eval.lmeval import scoring

log = logging.getLogger(__name__)

MAX_BATCH = 64  # lm-eval's hf backend's default max_batch_size
CPU_MAX_BATCH = 16
DEVICE_FRACTION = 0.9
HOST_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class AutoBatch:
    """What ``batch_size="auto"`` chose and why (all byte figures per device).

    Attributes:
      size: packed rows per scoring call (and rows per generation call).
      rows_of: the slots of the measured rows (the scorer's largest row length).
      budget_bytes: the memory the program may use; source: ``"device"`` or ``"host"`` (CPU).
      fixed_bytes, per_row_bytes: the linear fit of the program's bytes over its rows.
      program_bytes: the exact need of the chosen batch's program.
      cap: the largest batch considered.
    """

    size: int
    rows_of: int
    budget_bytes: int
    source: str
    fixed_bytes: int
    per_row_bytes: int
    program_bytes: int
    cap: int

    def describe(self) -> str:
        return (f"batch_size=auto: {self.size} packed rows of {self.rows_of} slots per call "
                f"({self.program_bytes / 2**20:.1f} MiB per device of a {self.source} budget of "
                f"{self.budget_bytes / 2**20:.0f} MiB; {self.per_row_bytes / 2**20:.2f} MiB per "
                f"row; cap {self.cap})")


def budget(mesh: jax.sharding.Mesh | None) -> tuple[int, str]:
    """(bytes a program may use per device, ``"device"`` or ``"host"``); see the module doc."""
    devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
    devices = [d for d in devices if d.process_index == jax.process_index()] or devices
    free = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            break
        free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    else:
        return int(min(free) * DEVICE_FRACTION), "device"
    try:
        host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 8 GiB
        host = 8 << 30
    return int(host * HOST_FRACTION / max(1, jax.local_device_count())), "host"


def _param_bytes(params: Sequence[dict]) -> int:
    """Bytes of the parameters on one device (shards, or whole replicated arrays)."""
    total = 0
    for x in jax.tree.leaves(params):
        shape = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") else x.shape
        total += int(np.prod(shape)) * x.dtype.itemsize
    return total


def lower_scorer(spec: DecodeSpec, params: Sequence[dict], rows: int, t: int, *,
                 n_sets: int = 1, mesh: jax.sharding.Mesh | None = None):
    """The scorer (:func:`jaxarith.eval.lmeval.scoring._score_packed`) lowered for ``rows``
    packed rows of ``t`` slots with ``t`` scored positions, its inputs placed as
    :func:`~jaxarith.eval.lmeval.scoring.score_requests` places them. ``params`` may be
    abstract (``jax.ShapeDtypeStruct`` with shardings: planning for a TPU slice)."""
    def arg(shape):
        s = None if mesh is None else sharding.named_sharding(mesh, ("batch", "seq"), shape)
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s)

    rows_ = tuple(arg((rows, t)) for _ in range(n_sets))
    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with ctx:
        return scoring._score_packed.lower(
            spec, tuple(params), member_weights(spec), rows_, rows_, rows_, rows_, rows_,
            arg((rows, t)), arg((rows, t)))


def program_bytes(spec: DecodeSpec, params: Sequence[dict], rows: int, t: int, *,
                  n_sets: int = 1, mesh: jax.sharding.Mesh | None = None) -> int:
    """Bytes per device the scorer needs for ``rows`` packed rows of ``t`` slots with ``t``
    scored positions, beyond the resident parameters (compiled, not run)."""
    exe = lower_scorer(spec, params, rows, t, n_sets=n_sets, mesh=mesh).compile()
    ma = exe.memory_analysis()
    need = (ma.temp_size_in_bytes + ma.output_size_in_bytes + ma.argument_size_in_bytes
            - ma.alias_size_in_bytes)
    return max(0, int(need) - _param_bytes(params))


def choose(spec: DecodeSpec, params: Sequence[dict], *, row_slots: int,
           mesh: jax.sharding.Mesh | None = None, n_sets: int = 1,
           max_batch_size: int | None = None,
           budget_bytes: int | None = None) -> AutoBatch:
    """The largest batch (packed rows of ``row_slots`` slots) whose scorer fits the budget.

    Args:
      spec, params: the members and their parameters (placed on ``mesh``).
      row_slots: the scorer's longest row (its largest bucket).
      n_sets: token rows per member set (1, or one per member with per-member contexts).
      max_batch_size: the cap (default :data:`MAX_BATCH`, :data:`CPU_MAX_BATCH` on a CPU).
      budget_bytes: override the measured budget (tests; a known share of a device).
    """
    dp = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    measured, source = budget(mesh)
    if budget_bytes is None:
        budget_bytes = measured
    else:
        source = "given"
    on_cpu = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform == "cpu"
    cap = max_batch_size or (CPU_MAX_BATCH if on_cpu else MAX_BATCH)
    cap = max(dp, cap // dp * dp)

    def need(rows):
        return program_bytes(spec, params, rows, row_slots, n_sets=n_sets, mesh=mesh)

    one, two = need(dp), need(2 * dp)
    per_row = max(1, (two - one) // dp)
    fixed = max(0, one - per_row * dp)
    size = max(dp, min(cap, (budget_bytes - fixed) // per_row // dp * dp))
    exact = need(size) if size not in (dp, 2 * dp) else (one if size == dp else two)
    while exact > budget_bytes and size > dp:
        size = max(dp, size // 2 // dp * dp)
        exact = need(size)
    return AutoBatch(size=int(size), rows_of=row_slots, budget_bytes=int(budget_bytes),
                     source=source, fixed_bytes=int(fixed), per_row_bytes=int(per_row),
                     program_bytes=int(exact), cap=int(cap))
