"""TPU slices for planning from any machine: slice names, libtpu's abstract devices, the bytes a
chip holds of an abstract tree, and what a compiled program needs per chip.

Slice names are Cloud TPU's (and MaxText's): ``v4-8``, ``v5p-128`` count TensorCores, two per
chip; ``v5e-16``, ``v6e-64`` count chips. The programs themselves are planned by
:mod:`jaxarith.planning.inference` (generation, lm-eval scoring) and ``train.plan`` (a train
step); both compile with the real TPU compiler (libtpu's abstract topologies, no TPU needed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterator

import jax
import numpy as np

from jaxarith.errors import ConfigError, JaxarithError

GiB = 1 << 30


class DoesNotFitError(JaxarithError):
    """The run's state cannot fit a chip's HBM on the slice (found before compiling)."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation: TensorCores per chip as slice names count them, HBM per chip, the
    topology's rank, and the name libtpu gives its topologies."""

    cores_per_chip: int
    hbm_bytes: int
    dims: int
    topology_prefix: str


GENERATIONS = {
    "v4": Generation(2, 32 * GiB, 3, "v4"),
    "v5p": Generation(2, 95 * GiB, 3, "v5p"),
    "v5e": Generation(1, 16 * GiB, 2, "v5e"),
    "v6e": Generation(1, 32 * GiB, 2, "v6e"),
}
# chips -> physical topology (Cloud TPU's standard slice shapes)
_TOPO_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}
_TOPO_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}
CHIPS_PER_HOST = 4


@dataclasses.dataclass(frozen=True)
class Slice:
    """A named TPU slice (or ``num_slices`` of them)."""

    name: str
    generation: str
    chips: int  # per slice
    topology: str  # libtpu's topology name, e.g. "v5p:2x2x1"
    hbm_bytes: int  # one chip's
    num_slices: int = 1

    @property
    def total_chips(self) -> int:
        return self.chips * self.num_slices

    @property
    def hosts(self) -> int:
        return max(1, self.total_chips // CHIPS_PER_HOST)


def parse_slice(name: str, num_slices: int = 1) -> Slice:
    """``v5p-8`` -> 4 chips of v5p on a 2x2x1 topology (v4/v5p names count TensorCores)."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower())
    if not m:
        raise ConfigError(f"--topology {name!r}: expected a slice name such as v5p-8, v5e-16, "
                          f"v4-8 or v6e-64 (generations: {', '.join(GENERATIONS)})")
    gen = GENERATIONS[m.group(1)]
    count = int(m.group(2))
    chips, rest = divmod(count, gen.cores_per_chip)
    table = _TOPO_3D if gen.dims == 3 else _TOPO_2D
    if rest or chips not in table:
        sizes = ", ".join(f"{m.group(1)}-{c * gen.cores_per_chip}" for c in table)
        raise ConfigError(f"--topology {name}: not a standard {m.group(1)} slice ({sizes})")
    if num_slices < 1:
        raise ConfigError(f"--slices {num_slices} must be >= 1")
    return Slice(name=f"{m.group(1)}-{count}", generation=m.group(1), chips=chips,
                 topology=f"{gen.topology_prefix}:{table[chips]}", hbm_bytes=gen.hbm_bytes,
                 num_slices=num_slices)


def libtpu_version() -> str | None:
    import importlib.metadata

    for dist in ("libtpu", "libtpu-nightly"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def topology_devices(sl: Slice) -> list:
    """The abstract TPU devices of the slice(s), from libtpu (no TPU needed)."""
    if libtpu_version() is None:
        raise JaxarithError("jaxarith plan compiles with the TPU compiler, which comes with "
                            "libtpu: pip install 'jaxarith[tpu]' (jax[tpu] at the installed "
                            f"jax {jax.__version__})")
    # a compile-only client: never take the TPU lock another process (a run, a second plan)
    # may hold
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=sl.topology,
                                            num_slices=sl.num_slices)
    except Exception as e:  # libtpu's message names the topology
        raise JaxarithError(f"libtpu could not describe {sl.name} ({sl.topology} x "
                            f"{sl.num_slices}): {str(e).splitlines()[0]}") from None
    return list(topo.devices)


# ----------------------------------------------------------------------------- bytes per chip


def chip_bytes(abstract) -> int:
    """Bytes one device holds of a tree of ``ShapeDtypeStruct`` with shardings (the largest
    shard: every device holds one of equal size, or a replica)."""
    total = 0
    for x in jax.tree.leaves(abstract):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def state_bytes(fns) -> dict[str, int]:
    """Per-chip bytes of each part of the train state and of the batch."""
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         fns.abstract_state, fns.state_shardings)
    batch = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         fns.abstract_batch, fns.batch_sharding)
    return {"params": chip_bytes(state.params), "optimizer": chip_bytes(state.opt_state),
            "average": chip_bytes(state.average), "frozen": chip_bytes(state.frozen),
            "batch": chip_bytes(batch)}


_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)(-start)?\(")
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64)\[([\d,]*)\]")
_ITEM = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
         "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """``kind -> {count, bytes}`` of the collectives in an HLO module's text (result bytes;
    async pairs counted at their start)."""
    out: dict[str, dict[str, int]] = {}
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        nbytes = sum(_ITEM[t] * math.prod(int(d) for d in dims.split(",") if d)
                     for t, dims in _SHAPE.findall(m.group(1)))
        entry = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += nbytes
    return dict(sorted(out.items()))


def refuse_if_over(sl: Slice, parts: dict[str, int], what: str,
                   advice: Callable[[str], str]) -> None:
    """Raise :class:`DoesNotFitError` (one line: the need, the largest part and ``advice`` for
    it) when the ``parts`` (per-chip bytes of what a program holds before its temporaries)
    alone exceed a chip's HBM."""
    need = sum(parts.values())
    if need > sl.hbm_bytes:
        largest = max(parts, key=parts.get)
        raise DoesNotFitError(
            f"does not fit: {what} alone needs {need / GiB:.1f} GiB per chip of the "
            f"{sl.hbm_bytes / GiB:.0f} GiB a {sl.generation} chip has (largest: {largest} "
            f"{parts[largest] / GiB:.1f} GiB); try {advice(largest)}")


_COMPILER_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM "
                          r"\(([\d.]+)([KMGT])\)")


@contextlib.contextmanager
def refuse_if_compiler_out_of_memory(sl: Slice, advice: str) -> Iterator[None]:
    """Within the block (a compile), the TPU compiler's out-of-HBM refusal (the state fits, the
    temporaries do not) becomes :class:`DoesNotFitError`, one line with ``advice``; any other
    error passes unchanged."""
    try:
        yield
    except Exception as e:
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg or "Ran out of memory" not in msg:
            raise
        m = _COMPILER_OOM.search(msg)
        what = (f"the program's temporaries alone need {m.group(1)} {m.group(2)}iB per chip of "
                f"the {m.group(3)} {m.group(4)}iB the compiler may use" if m else
                f"the compiler ran out of a {sl.generation} chip's HBM")
        raise DoesNotFitError(f"does not fit: {what} (the TPU compiler refused the program); "
                              f"try {advice}") from None


def memory(compiled) -> dict[str, int]:
    """A compiled program's per-chip bytes from ``memory_analysis()``: ``argument``, ``output``,
    ``alias`` (donated), ``temp`` and ``total = argument + output - alias + temp``, what the
    chip must hold while it runs; also the compiler's ``peak`` and the ``host_temp`` that
    offloaded activations take in pinned host memory (``model.remat: offload``)."""
    ma = compiled.memory_analysis()
    out = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "host_temp")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["peak"] = int(getattr(ma, "peak_memory_in_bytes", 0) or 0)
    return out


def with_shardings(abstract, shardings):
    """``ShapeDtypeStruct`` leaves of ``abstract`` carrying the matching ``shardings``."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
