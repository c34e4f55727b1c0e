"""The train state and the pure, jitted train step.

The state is one pytree: ``TrainState(step, params, opt_state, average, frozen)``; the step is
``train_step(state, batch) -> (state, metrics)``, compiled once ahead of time with explicit in/out
shardings (parameters by their logical axes, optimizer moments and averages like the
parameters, the batch over the data-parallel axes) and the state donated.

Extension points, so new capabilities do not rewrite the loop:

* ``loss_fn(params, frozen, batch) -> (loss_sum, count, metrics)``: the one loss interface.
  ``batch`` is a dict of one microbatch's arrays (``tokens`` ``[b, T]`` always; more fields when
  declared with ``build_step(batch_fields=...)``, e.g. ``weights`` ``[b, T]`` loss weights of
  each target token for instruction tuning, ``segment_ids`` and ``positions`` of packed
  documents (:func:`train.losses.packed_fields`), or cached teacher top-k for distillation).
  ``loss_sum`` and every value of ``metrics`` are *sums over the microbatch's tokens*; the step
  adds them over microbatches and divides each by the total ``count`` once, so accumulation is
  exact for all of them. The default is next-token NLL (:func:`next_token_loss_fn`); a
  distillation loss reads a frozen teacher from ``frozen`` (held in the state, sharded, never
  differentiated or updated).
* ``average``: any :class:`jaxarith.average.averagers.Averager` (EMA, SWA, LaWA, ...), updated
  inside the step and sharded as its ``shardings`` method says.
* initial ``params`` may come from anywhere (a checkpoint, scratch, inherited layers).

The training program (:mod:`train.loop`) fills these from the config: an
:class:`train.extensions.Extension` gives the loss factory, extra batch fields, frozen trees
(held in ``TrainState.frozen[extension name]``, never checkpointed) and the initial params.

Gradient accumulation: every batch field arrives as ``[M, b, T, ...]`` (M microbatches);
gradients of the *summed* loss are accumulated in float32 over a ``lax.scan`` and divided by the
total number of predicted tokens once, so k microbatches give the same update as one k-times
larger batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxarith import sharding
from jaxarith.average.averagers import make_averager
from jaxarith.errors import ConfigError
from jaxarith.models import transformer
from jaxarith.models.config import ModelConfig
from jaxarith.models.remat import Remat
from train import losses

Params = dict
Batch = dict  # field name -> one microbatch's array, [b, T, ...]
LossFn = Callable[[Params, Any, Batch], tuple[jax.Array, jax.Array, dict]]
BATCH_AXES = (None, "batch", "seq")  # [microbatch, batch, seq]
# The default batch: token ids only. Other fields: name -> (trailing shape after [T], dtype).
TOKENS_ONLY = {"tokens": ((), "int32")}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step reads and writes.

    Attributes:
      step: optimizer steps taken (int32 scalar).
      params: float32 master weights (canonical tree).
      opt_state: optax state.
      average: an averager (EMA/SWA) or None.
      frozen: non-trainable trees carried along (e.g. a distillation teacher); ``{}`` by default.
    """

    step: jax.Array
    params: Params
    opt_state: Any
    average: Any = None
    frozen: Any = dataclasses.field(default_factory=dict)


def decay_mask(params: Params) -> Params:
    """True for tensors that get weight decay: not norms, not biases."""
    def one(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        return not any("norm" in n for n in names) and not names[-1].endswith("bias")

    return jax.tree.map_with_path(one, params)


def make_optimizer(opt, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW with the decay mask (``opt``: an OptimizerConfig)."""
    parts = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def next_token_loss_fn(cfg: ModelConfig, *, dtype=jnp.float32, remat: Remat | str | bool = False,
                       fused: bool = True, attention: str = "xla") -> LossFn:
    """The default loss: summed next-token NLL, its token count and no extra metrics.

    Honours an optional ``batch["weights"]`` (``[b, T]`` loss weights of target tokens) and
    packed documents' ``segment_ids`` and ``positions`` (:func:`train.losses.packed_fields`). A
    routed family (Mixtral) gets NLL plus its router losses (:func:`train.losses.moe_loss_fn`).
    ``fused`` (default): the output head and the cross-entropy run fused and chunked
    (:mod:`jaxarith.models.fused_ce`; the ``[b, T, V]`` logits are never held); False: through
    the full logits, as evaluation does. ``attention``: see
    :func:`jaxarith.models.transformer.forward`.
    """
    if transformer.family(cfg).routed:
        return losses.moe_loss_fn(cfg, dtype=dtype, remat=remat, attention=attention)

    def loss(params, frozen, batch):
        del frozen
        nll, count = transformer.next_token_loss(params, cfg, batch["tokens"],
                                                 weights=batch.get("weights"), dtype=dtype,
                                                 remat=remat, fused=fused, attention=attention,
                                                 **losses.packed_fields(batch))
        return nll, count, {}

    return loss


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepFns:
    """What :func:`build_step` returns: the init and step functions and their shardings."""

    init: Callable[[Params], TrainState]
    step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    state_shardings: Any
    batch_sharding: Any
    abstract_state: Any
    abstract_batch: Any


def _replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(abstract_state: TrainState, param_shd, tx, mesh, frozen_shd=None):
    """Shardings for every leaf of the state: moments and averages follow the parameters."""
    rep = _replicated(mesh)
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, param_shd,
                                transform_non_params=lambda _: rep)
    avg = abstract_state.average
    if avg is not None:  # each averager lays out its own leaves (LaWA: a [k, ...] ring buffer)
        avg = avg.shardings(param_shd, rep)
    frozen = frozen_shd if frozen_shd is not None else \
        jax.tree.map(lambda _: rep, abstract_state.frozen)
    return TrainState(step=rep, params=param_shd, opt_state=opt, average=avg, frozen=frozen)


def check_batch_fits(batch: int, microbatches: int, mesh, process_count: int = 1) -> None:
    """Refuse (before compiling) a batch that the mesh's data-parallel axes cannot split."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % microbatches:
        raise ConfigError(f"batch={batch} is not divisible by microbatches={microbatches}")
    micro = batch // microbatches
    if micro % dp:
        raise ConfigError(
            f"batch={batch} / microbatches={microbatches} = {micro} sequences per microbatch "
            f"is not divisible by the data-parallel size {dp} (mesh axes data x fsdp = "
            f"{mesh.shape['data']} x {mesh.shape['fsdp']})")
    if (batch // process_count) % microbatches:
        raise ConfigError(f"batch={batch} over {process_count} processes does not split into "
                          f"microbatches={microbatches} per process")


def build_step(
    cfg: ModelConfig,
    mesh,
    *,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    batch: int,
    seq_len: int,
    microbatches: int = 1,
    loss_fn: LossFn,
    average: tuple[str, dict] = ("none", {}),
    skip_nonfinite: bool = False,
    frozen: Any = None,
    frozen_shardings: Any = None,
    batch_fields: dict | None = None,
) -> StepFns:
    """Build the state initialiser and the train step for ``cfg`` on ``mesh`` (not compiled).

    Args:
      tx: the optimizer; ``schedule`` only feeds the ``lr`` metric.
      batch, seq_len, microbatches: the global batch ``[microbatches, batch // microbatches,
        seq_len]`` the step takes.
      loss_fn: ``(params, frozen, batch) -> (loss_sum, count, metrics)`` (see the module doc).
      average: (kind, options) for :func:`jaxarith.average.averagers.make_averager`.
      skip_nonfinite: a step with a non-finite loss or gradient leaves the state unchanged.
      frozen: non-trainable trees kept in the state (abstract or concrete).
      batch_fields: the batch's fields, ``name -> (trailing shape after T, dtype)``; default
        :data:`TOKENS_ONLY`. Each arrives as ``[microbatches, batch // microbatches, seq_len,
        *trailing]`` sharded over the data-parallel axes.
    Returns:
      :class:`StepFns`.
    """
    check_batch_fits(batch, microbatches, mesh)
    frozen = {} if frozen is None else frozen
    param_shd = transformer.param_shardings(cfg, mesh)

    def init(params: Params, frozen_in=None) -> TrainState:
        avg = make_averager(average[0], params, **average[1])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), average=avg,
                          frozen=frozen if frozen_in is None else frozen_in)

    abstract_params = transformer.abstract_params(cfg, jnp.float32, mesh)
    abstract_frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
    abstract_state = jax.eval_shape(init, abstract_params, abstract_frozen)
    shd = state_shardings(abstract_state, param_shd, tx, mesh, frozen_shardings)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, shd)
    fields = dict(TOKENS_ONLY if batch_fields is None else batch_fields)
    if "tokens" not in fields:
        raise ConfigError(f"batch_fields must include 'tokens' (got {sorted(fields)})")
    batch_shd, abstract_batch = {}, {}
    for name, (trailing, dtype) in fields.items():
        shape = (microbatches, batch // microbatches, seq_len, *trailing)
        batch_shd[name] = sharding.named_sharding(
            mesh, BATCH_AXES + (None,) * len(trailing), shape)
        abstract_batch[name] = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype),
                                                    sharding=batch_shd[name])

    def split_aux(params, frozen_, mb):
        loss_sum, n, m = loss_fn(params, frozen_, mb)
        return loss_sum, (n, m)

    grad_fn = jax.value_and_grad(split_aux, has_aux=True)

    def step(state: TrainState, batch_in: dict) -> tuple[TrainState, dict]:
        def micro(carry, mb):
            g_acc, loss_acc, n_acc, m_acc = carry
            (loss_sum, (n, m)), g = grad_fn(state.params, state.frozen, mb)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            m_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), m_acc, m)
            return (g_acc, loss_acc + loss_sum, n_acc + n, m_acc), None

        first = jax.tree.map(lambda x: x[0], batch_in)
        if microbatches == 1:  # no accumulation buffers: the gradient is the sum
            (loss_total, (count, m_sum)), g_sum = grad_fn(state.params, state.frozen, first)
            g_sum = jax.tree.map(lambda g: g.astype(jnp.float32), g_sum)
            m_sum = jax.tree.map(lambda m: m.astype(jnp.float32), m_sum)
            count = count.astype(jnp.float32)
            loss_total = loss_total.astype(jnp.float32)
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            zeros = jax.lax.with_sharding_constraint(zeros, param_shd)
            m_shape = jax.eval_shape(loss_fn, state.params, state.frozen, first)[2]
            m_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), m_shape)
            init_carry = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), m_zeros)
            (g_sum, loss_total, count, m_sum), _ = jax.lax.scan(micro, init_carry, batch_in)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        loss = loss_total / denom
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_step = state.step + 1
        avg = None if state.average is None else state.average.update(params, new_step)
        new = TrainState(step=new_step, params=params, opt_state=opt_state, average=avg,
                         frozen=state.frozen)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            kept = dataclasses.replace(state, step=new_step)
            new = jax.tree.map(functools.partial(jnp.where, finite), new, kept)
        metrics = {k: v / denom for k, v in m_sum.items()}
        # the LR this step applied: optax's own schedule counter, which stops at skipped steps
        # (state.step does not), so the logged LR is the one the update used
        metrics.update({"loss": loss, "grad_norm": grad_norm,
                        "lr": schedule(schedule_count(state.opt_state, state.step)),
                        "tokens": count, "finite": finite})
        return new, metrics

    return StepFns(init=init, step=step, state_shardings=shd, batch_sharding=batch_shd,
                   abstract_state=abstract_state, abstract_batch=abstract_batch)


def schedule_count(opt_state, default: jax.Array) -> jax.Array:
    """The step count optax's LR schedule reads (``ScaleByScheduleState.count``), or
    ``default`` when the optimizer has no scheduled LR."""
    for path, count in optax.tree_utils.tree_get_all_with_path(opt_state, "count"):
        if getattr(path[-1], "tuple_name", "") == "ScaleByScheduleState":
            return count
    return default


def compile_step(fns: StepFns, mesh):
    """``jax.jit`` the step with explicit shardings and donation, compiled ahead of time.

    Returns:
      (compiled, info) where ``info`` has ``flops`` (per step, from XLA's cost analysis, may be
      None) and ``memory`` (the compiled memory analysis as a dict of byte counts, may be empty).
    """
    rep = _replicated(mesh)  # every metric is a replicated scalar (a sharding prefix)
    jitted = jax.jit(fns.step, in_shardings=(fns.state_shardings, fns.batch_sharding),
                     out_shardings=(fns.state_shardings, rep), donate_argnums=0)
    with jax.set_mesh(mesh):
        compiled = jitted.lower(fns.abstract_state, fns.abstract_batch).compile()
    return compiled, compiled_info(compiled)


def compiled_info(compiled) -> dict:
    info: dict = {"flops": None, "memory": {}}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        info["flops"] = float(cost.get("flops", 0.0)) if cost else None
    except Exception:  # not every backend reports costs
        pass
    try:
        mem = compiled.memory_analysis()
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                     "alias_size_in_bytes", "generated_code_size_in_bytes",
                     "peak_memory_in_bytes", "host_temp_size_in_bytes"):
            if hasattr(mem, name):
                info["memory"][name] = int(getattr(mem, name))
    except Exception:
        pass
    return info


def scratch_params(cfg: ModelConfig, seed: int, mesh=None) -> Params:
    """Random initial weights by the one init rule, :func:`jaxarith.models.transformer.init_params`,
    with an int seed: drawn on the host with numpy (leaf ``i`` from ``default_rng([seed, i])``,
    independent of the mesh; cheaper to start on CPU than compiling the jitted initialiser) and
    placed on their shardings.
    """
    return transformer.init_params(cfg, int(seed), mesh=mesh)


def init_state(fns: StepFns, params: Params, mesh, frozen=None) -> TrainState:
    """Materialise the state from ``params`` directly onto its shardings (params donated)."""
    jitted = jax.jit(fns.init, out_shardings=fns.state_shardings, donate_argnums=0)
    with jax.set_mesh(mesh):
        return jitted(params, frozen if frozen is not None else {})
