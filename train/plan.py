"""Plan a run for a TPU slice from any machine: compile exactly the step the run would build for
the named slice with the real TPU compiler (libtpu's abstract topologies, no TPU needed) and
report what one chip holds.

    jaxarith plan configs/llama3_2_1b_cpt_pod.yaml --topology v5e-16 --json
    python -m train configs/llama3_2_1b_cpt_pod.yaml --compile-only --topology v5e-16

Slice names are Cloud TPU's (and MaxText's): ``v4-8``, ``v5p-128`` count TensorCores, two per
chip; ``v5e-16``, ``v6e-64`` count chips. ``--slices N`` compiles for N such slices (multislice:
the mesh's data axis then spans the slices).

What is reported per chip comes from two sources, both exact:

- the state the step holds (parameters, optimizer state, averages, frozen trees such as a
  distillation teacher) and the batch: each array's shard shape on the mesh, times its item size;
- the compiled program's ``memory_analysis()``: arguments, outputs, aliased (donated) bytes and
  temporaries. ``total = argument + output - alias + temp`` is what the chip must hold.
  ``peak`` is the analysis' ``peak_memory_in_bytes``: the activations a remat policy keeps show
  there even when the TPU compiler places them in on-chip memory and ``temp`` does not move
  (2-layer configs); ``host_temp`` is the temporaries in host memory (``model.remat=offload``).

The chip's HBM is its nominal capacity (:data:`GENERATIONS`). Before compiling, the state alone is
checked against it: a state that cannot fit is refused at once (a 70B model on v5e-16), naming
the largest part and what would help. The collectives are counted in the compiled program's HLO
by kind, with the bytes of their results; an op inside a scanned layer body appears once in the
program text, so these are per-program counts, not per-step totals. ``cost_analysis()`` is not
used: it counts a scan's body once, so its FLOPs and times are not a step's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import numpy as np

from jaxarith.data.sources import SourceKind
from jaxarith.errors import ConfigError, JaxarithError
from jaxarith.io import refs
from jaxarith.models import kernels
from jaxarith.models.config import ModelConfig, config_from_hf
from jaxarith.models.remat import Remat
from jaxarith.models.transformer import abstract_params, param_shardings
from jaxarith.sharding import make_mesh, set_strict_sharding
from train.config import TrainConfig
from train.extensions import Extension, discover, only_one
from train.loop import run_step
from train.step import TOKENS_ONLY, check_batch_fits

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


# ----------------------------------------------------------------------------- the plan


def _model_config(cfg: TrainConfig, extensions) -> ModelConfig:
    ext = only_one(extensions, "model")
    if ext is not None:
        return ext.model(cfg)[0]
    if cfg.model.ref:
        return refs.load_config(cfg.model.ref)
    return config_from_hf({"model_type": cfg.model.arch, **cfg.model.config})


def _fields(cfg: TrainConfig, extensions: list[Extension]) -> dict:
    fields = dict(TOKENS_ONLY)
    if any(s.kind is SourceKind.CHAT for s in cfg.data.sources):
        fields["weights"] = ((), "float32")
    for ext in extensions:
        fields.update(ext.batch_fields)
    return fields


def _advice(part: str, cfg: TrainConfig, mesh) -> str:
    if part == "temp":
        remat = "" if cfg.model.remat is Remat.FULL else \
            f"model.remat=full (now {cfg.model.remat.value}), "
        return (f"{remat}more microbatches (microbatches={cfg.microbatches * 2}), "
                "or a smaller batch")
    if part == "batch":
        return "fewer sequences per step or more microbatches"
    fsdp = mesh.shape["fsdp"]
    return (f"a larger fsdp axis (mesh fsdp={fsdp} now; mesh=fsdp=-1 shards over every chip) "
            "or a larger slice")


def plan_train(cfg: TrainConfig, sl: Slice, *, extensions: list[Extension] | None = None
               ) -> dict[str, Any]:
    """Compile ``cfg``'s train step for the slice and report per-chip bytes (see module doc).

    Raises:
      JaxarithError: libtpu missing, or the state alone exceeds a chip's HBM (before compiling).
    """
    extensions = list(discover(cfg) if extensions is None else extensions)
    devices = topology_devices(sl)
    mesh = make_mesh(cfg.mesh, devices=devices)
    set_strict_sharding(cfg.mesh_strict)
    check_batch_fits(cfg.batch, cfg.microbatches, mesh, sl.hosts)
    model_cfg = _model_config(cfg, extensions)
    param_shardings(model_cfg, mesh, strict=cfg.mesh_strict)
    if cfg.data.seq_len > model_cfg.context_length:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's context length "
                          f"{model_cfg.context_length}")
    frozen = {}
    for ext in extensions:
        if ext.frozen is None:
            continue
        if ext.abstract_frozen is None:
            raise ConfigError(f"{ext.name}: this extension's frozen tree has no abstract form; "
                              "jaxarith plan cannot size it")
        frozen[ext.name] = ext.abstract_frozen(cfg, model_cfg, mesh)
    state_precheck(cfg, sl, model_cfg, mesh, frozen)
    t0 = time.perf_counter()
    fns, compiled, info = run_step(cfg, model_cfg, mesh, only_one(extensions, "loss"),
                                   _fields(cfg, extensions), frozen)
    compile_s = time.perf_counter() - t0
    parts = state_bytes(fns)
    mem = info["memory"]
    total = (mem.get("argument_size_in_bytes", 0) + mem.get("output_size_in_bytes", 0)
             - mem.get("alias_size_in_bytes", 0) + mem.get("temp_size_in_bytes", 0))
    per_chip = {**parts, "temp": mem.get("temp_size_in_bytes", 0),
                "argument": mem.get("argument_size_in_bytes", 0),
                "output": mem.get("output_size_in_bytes", 0),
                "alias": mem.get("alias_size_in_bytes", 0), "total": total,
                "peak": mem.get("peak_memory_in_bytes", 0),
                "host_temp": mem.get("host_temp_size_in_bytes", 0)}
    largest = max(("params", "optimizer", "average", "frozen", "batch", "temp"),
                  key=lambda k: per_chip[k])
    return {
        "topology": sl.name, "topology_name": sl.topology, "slices": sl.num_slices,
        "chips": sl.total_chips, "hbm_bytes": sl.hbm_bytes, "fits": total <= sl.hbm_bytes,
        "per_chip_bytes": per_chip, "compile_seconds": round(compile_s, 1),
        "collectives": collectives(compiled.as_text()),
        "mesh": {a: int(mesh.shape[a]) for a in mesh.axis_names},
        "batch": cfg.batch, "seq_len": cfg.data.seq_len, "microbatches": cfg.microbatches,
        "remat": cfg.model.remat.value, "compute_dtype": cfg.model.compute_dtype,
        "attention": kernels.resolve(cfg.model.attention, mesh, cfg.data.seq_len),
        "model_type": model_cfg.model_type, "jax": jax.__version__, "libtpu": libtpu_version(),
        "largest": largest,
        "advice": None if total <= sl.hbm_bytes else _advice(largest, cfg, mesh),
    }


def state_precheck(cfg: TrainConfig, sl: Slice, model_cfg: ModelConfig, mesh, frozen) -> None:
    """Refuse, before compiling, a state that alone exceeds a chip's HBM: float32 master
    weights, AdamW's two float32 moments (sharded as the weights), an average's copy, frozen
    trees. The step's activations come on top, so a state that fits may still not."""
    params = chip_bytes(abstract_params(model_cfg, mesh=mesh))
    parts = {"params": params, "optimizer": 2 * params,
             "average": 0 if cfg.average.in_step()[0] == "none" else params,
             "frozen": chip_bytes(frozen)}
    state = sum(parts.values())
    if state > sl.hbm_bytes:
        largest = max(parts, key=parts.get)
        raise DoesNotFitError(
            f"does not fit: the state alone needs {state / GiB:.1f} GiB per chip of the "
            f"{sl.hbm_bytes / GiB:.0f} GiB a {sl.generation} chip has (largest: {largest} "
            f"{parts[largest] / GiB:.1f} GiB); try {_advice(largest, cfg, mesh)}")
