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

import time
from typing import Any

import jax

from jaxarith.data.sources import Packing, SourceKind
from jaxarith.errors import ConfigError
from jaxarith.models import kernels
from jaxarith.models.config import ModelConfig, config_from_hf
from jaxarith.models.remat import Remat
from jaxarith.models.transformer import abstract_params, param_shardings
from jaxarith.planning import slices
from jaxarith.planning.inference import model_config
from jaxarith.planning.slices import (
    DoesNotFitError,
    Slice,
    chip_bytes,
    collectives,
    libtpu_version,
    parse_slice,
    topology_devices,
)
from jaxarith.sharding import make_mesh, set_strict_sharding
from train.config import TrainConfig
from train.extensions import Extension, discover, only_one
from train.loop import run_step
from train.step import TOKENS_ONLY, check_batch_fits

GiB = slices.GiB
# the slice helpers live in jaxarith.planning.slices; re-exported for train's callers
__all__ = ["DoesNotFitError", "GiB", "Slice", "chip_bytes", "collectives", "libtpu_version",
           "parse_slice", "plan_train", "state_bytes", "state_precheck", "topology_devices"]


def state_bytes(fns) -> dict[str, int]:
    """Per-chip bytes of each part of the train state and of the batch."""
    state = slices.with_shardings(fns.abstract_state, fns.state_shardings)
    batch = slices.with_shardings(fns.abstract_batch, fns.batch_sharding)
    return {"params": chip_bytes(state.params), "optimizer": chip_bytes(state.opt_state),
            "average": chip_bytes(state.average), "frozen": chip_bytes(state.frozen),
            "batch": chip_bytes(batch)}


# ----------------------------------------------------------------------------- the plan


def _model_config(cfg: TrainConfig, extensions) -> ModelConfig:
    ext = only_one(extensions, "model")
    if ext is not None:
        return ext.model(cfg)[0]
    if cfg.model.ref:  # a preset name, a config.json, an HF dir, a hub id (config only)
        return model_config(cfg.model.ref)
    return config_from_hf({"model_type": cfg.model.arch, **cfg.model.config})


def _fields(cfg: TrainConfig, extensions: list[Extension]) -> dict:
    fields = dict(TOKENS_ONLY)
    if any(s.kind is SourceKind.CHAT for s in cfg.data.sources):
        fields["weights"] = ((), "float32")
    if cfg.data.packing is Packing.DOCUMENTS:  # packed documents' segment ids and positions
        fields.update(segment_ids=((), "int32"), positions=((), "int32"))
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
    with slices.refuse_if_compiler_out_of_memory(sl, _advice("temp", cfg, mesh)):
        fns, compiled, info = run_step(cfg, model_cfg, mesh, only_one(extensions, "loss"),
                                       _fields(cfg, extensions), frozen)
    compile_s = time.perf_counter() - t0
    parts = state_bytes(fns)
    per_chip = {**parts, **slices.memory(compiled)}
    total = per_chip["total"]
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
    slices.refuse_if_over(sl, parts, "the state", lambda part: _advice(part, cfg, mesh))
