"""The training loop: resolve the model, build data, compile the step once, then step and run
hooks; at the end, the end-of-run hooks and the export.

``run(cfg)`` is what ``python -m train CONFIG.yaml`` and ``jaxarith train`` call. Restarting the
same command resumes from the latest checkpoint in ``OUT/checkpoints`` (state, optimizer, average,
data iterator position), so the resumed run ends exactly where an uninterrupted one would.

Extension points (details in :mod:`train.extensions`): after every step the loop runs each
:class:`~train.extensions.Hook` ``(name, every, fn, at_end)`` that is due; the built-in ones
(:func:`default_hooks`) log metrics, evaluate, checkpoint and plot. Features add hooks, a loss,
batch fields, frozen trees (not checkpointed), the model config and the initial params through an
:class:`~train.extensions.Extension`, discovered from :mod:`train.plugins` or passed as
``run(cfg, extensions=[...])``.

The loop's parts live beside it: :mod:`train.hooks` (the built-in hooks),
:mod:`train.evaluation` (held-out loss), :mod:`train.resume` (what a resume must agree with, a
finished run reported), :mod:`train.checkpoint` (the checkpoint store); the compiled step is
keyed by one :class:`StepKey`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxarith import data as data_lib
from jaxarith import distributed, sharding
from jaxarith.data.assets import bundled_tokenizer
from jaxarith.errors import CheckpointError, ConfigError, JaxarithError
from jaxarith.io import paths, refs
from jaxarith.io.atomic import check_destination, claim_dir
from jaxarith.io.refs import load_model, load_tokenizer
from jaxarith.models import kernels, transformer
from jaxarith.models.config import ModelConfig, config_from_hf, load_config
from jaxarith.models.remat import Remat
from jaxarith.sharding import make_mesh, set_strict_sharding
from train import metrics as metrics_lib
from train.checkpoint import Checkpoints
from train.config import OnNonFinite, TrainConfig, to_dict
from train.evaluation import eval_examples, make_eval
from train.export import export_hf
from train.extensions import Extension, Hook, Keyed, RunContext, discover, only_one
from train.hooks import default_hooks, end_hooks, run_hook, sci
from train.resume import (
    absent_or_empty,
    check_checkpoint_dir,
    check_config_unchanged,
    check_resume,
    check_streams,
    checkpoint_steps,
    config_changes,
    finished_summary,
    report_finished,
    unclaim,
    write_summary,
)
from train.step import (
    TOKENS_ONLY,
    build_step,
    check_batch_fits,
    compile_step,
    init_state,
    make_optimizer,
    next_token_loss_fn,
    scratch_params,
)

log = logging.getLogger(__name__)


class NonFiniteLossError(JaxarithError):
    """The loss or gradient became NaN/inf (``on_nonfinite: stop``)."""


@dataclasses.dataclass
class _Stop:
    """Set by SIGTERM / SIGINT: save a checkpoint and leave at the next step boundary."""

    requested: str = ""


def initialize_distributed() -> None:
    """Join the cluster ``jax.distributed`` detects (``distributed: true``) unless this process
    already joined one (``--coordinator`` / ``--distributed``, see :mod:`jaxarith.distributed`);
    no cluster found is a one-line :class:`ConfigError`."""
    distributed.initialize(distributed.ClusterConfig(auto=True))


# ----------------------------------------------------------------------------- model & data


def model_config(cfg: TrainConfig, extensions: Sequence[Extension] = ()
                 ) -> tuple[ModelConfig, str | None]:
    """The model config and the directory of the starting checkpoint (None from scratch).

    An extension with ``model`` (e.g. layer inheritance) decides instead."""
    ext = only_one(extensions, "model")
    if ext is not None:
        return ext.model(cfg)
    m = cfg.model
    if not m.ref:
        return config_from_hf({"model_type": m.arch, **m.config}), None

    directory = refs.resolve(m.ref).dir
    return load_config(directory), directory


def initial_params(cfg: TrainConfig, model_cfg: ModelConfig, mesh, progress: bool,
                   extensions: Sequence[Extension] = ()):
    """Start weights: an extension's ``init_params``, else loaded from ``model.ref`` onto the
    mesh, else random (``seed``)."""
    ext = only_one(extensions, "init_params")
    if ext is not None:
        return ext.init_params(cfg, model_cfg, mesh)
    if cfg.model.ref:
        return load_model(cfg.model.ref, mesh=mesh, dtype=jnp.float32, progress=progress).params
    return scratch_params(model_cfg, cfg.seed, mesh)


def tokenizer_for(cfg: TrainConfig, model_dir: str | None):
    """The tokenizer: ``bundled``, a directory, or (default) the starting model's."""
    name = cfg.model.tokenizer or model_dir
    if not name or name == "bundled":
        return bundled_tokenizer()

    return load_tokenizer(name)



def batch_fields(example: dict, seq_len: int, extensions: Sequence[Extension] = ()) -> dict:
    """The step's batch fields: every per-token field of a data ``example`` (leading dimension
    ``seq_len``: ``tokens``, a chat source's ``weights``, ...) as ``name -> (trailing shape,
    dtype)``; fields an extension declares must be among them."""
    fields = dict(TOKENS_ONLY)
    for name, value in example.items():
        v = np.asarray(value)
        if v.ndim >= 1 and v.shape[0] == seq_len and name != "tokens":
            fields[name] = (tuple(v.shape[1:]), str(v.dtype))
    for ext in extensions:
        for name, (trailing, dtype) in ext.batch_fields.items():
            if name not in fields:
                raise ConfigError(f"{ext.name} needs the batch field {name!r} but the data "
                                  f"examples have only {sorted(fields)}")
            if tuple(fields[name][0]) != tuple(trailing):
                raise ConfigError(f"{ext.name}: batch field {name!r} has trailing shape "
                                  f"{fields[name][0]} in the data, expected {tuple(trailing)}")
            fields[name] = (tuple(trailing), str(np.dtype(dtype)))
    return fields


def load_frozen(cfg: TrainConfig, model_cfg: ModelConfig, mesh,
                extensions: Sequence[Extension]) -> dict:
    """``{extension name: tree}`` of every extension's frozen arrays (already sharded)."""
    return {e.name: e.frozen(cfg, model_cfg, mesh) for e in extensions if e.frozen is not None}


def _abstract(tree):
    """Shapes, dtypes and shardings of a tree of arrays (what a compiled step depends on)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)),
                        tree)


def _tree_key(abstract) -> tuple:
    return tuple((jax.tree_util.keystr(p), tuple(x.shape), str(x.dtype), x.sharding)
                 for p, x in jax.tree_util.tree_leaves_with_path(abstract))


# ----------------------------------------------------------------------------- compiled pieces


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepKey:
    """Everything that shapes the compiled train step, as one frozen, hashable key: two runs
    with equal keys share one compiled program (:func:`compiled_step` caches by it).

    Attributes:
      loss: None (next-token NLL) or a :class:`Keyed` whose value is the extension's loss
        factory ``(model_cfg, dtype=, remat=, attention=) -> loss_fn`` and whose key says what
        shapes it.
      fields: the batch fields as a tuple of ``(name, (trailing, dtype))`` (None: tokens only).
      frozen: None or a :class:`Keyed` of the abstract frozen tree (key: its shapes/shardings).
      attention: the resolved attention kernel (:func:`jaxarith.models.kernels.resolve`).
    """

    model_cfg: ModelConfig
    mesh: Any
    optimizer: Any
    schedule: Any
    batch: int
    seq_len: int
    microbatches: int
    average: Any
    skip_nonfinite: bool
    compute_dtype: str
    remat: Remat
    loss: Keyed | None = None
    fields: tuple | None = None
    frozen: Keyed | None = None
    attention: str = "xla"


@functools.lru_cache(maxsize=4)
def compiled_step(key: StepKey):
    """Build and AOT-compile the train step of ``key`` (cached in-process by the key, so a
    resumed or repeated run in the same process does not compile again).

    Returns:
      (StepFns, compiled step, info) with ``info`` holding XLA's flops, memory analysis and
      ``compile_s``.
    """
    sched = key.schedule.build()
    dtype = jnp.dtype(key.compute_dtype)
    # a loss factory gets `attention` only for a kernel: factories written before it existed
    # (``(model_cfg, *, dtype, remat)``) keep working with XLA attention
    kernel = {} if key.attention == "xla" else {"attention": key.attention}
    make_loss = next_token_loss_fn if key.loss is None else key.loss.value
    abstract_frozen = None if key.frozen is None else key.frozen.value
    frozen_shd = None if key.frozen is None else \
        jax.tree.map(lambda x: x.sharding, abstract_frozen)
    fns = build_step(key.model_cfg, key.mesh, tx=make_optimizer(key.optimizer, sched),
                     schedule=sched, batch=key.batch, seq_len=key.seq_len,
                     microbatches=key.microbatches,
                     loss_fn=make_loss(key.model_cfg, dtype=dtype, remat=key.remat,
                                       **kernel),
                     average=key.average.in_step(), skip_nonfinite=key.skip_nonfinite,
                     frozen=abstract_frozen, frozen_shardings=frozen_shd,
                     batch_fields=None if key.fields is None else dict(key.fields))
    t0 = time.perf_counter()
    compiled, info = compile_step(fns, key.mesh)
    info["compile_s"] = time.perf_counter() - t0
    return fns, compiled, info


def step_key(cfg: TrainConfig, model_cfg: ModelConfig, mesh, loss_ext: Extension | None,
             fields: dict, abstract_frozen) -> StepKey:
    """The :class:`StepKey` of a run's config: the one place that turns a config into the
    compiled step, for the loop and for ``jaxarith plan`` (which passes a TPU topology's mesh
    and abstract frozen trees)."""
    return StepKey(
        model_cfg=model_cfg, mesh=mesh, optimizer=cfg.optimizer, schedule=cfg.schedule,
        batch=cfg.batch, seq_len=cfg.data.seq_len, microbatches=cfg.microbatches,
        average=cfg.average, skip_nonfinite=cfg.on_nonfinite is OnNonFinite.SKIP,
        compute_dtype=cfg.model.compute_dtype, remat=cfg.model.remat,
        loss=None if loss_ext is None else Keyed((loss_ext.name, loss_ext.loss_key),
                                                 loss_ext.loss),
        fields=None if fields == TOKENS_ONLY else tuple(sorted(fields.items())),
        frozen=Keyed(_tree_key(abstract_frozen), abstract_frozen) if abstract_frozen else None,
        attention=kernels.resolve(cfg.model.attention, mesh, cfg.data.seq_len))


def run_step(cfg: TrainConfig, model_cfg: ModelConfig, mesh, loss_ext: Extension | None,
             fields: dict, abstract_frozen):
    """:func:`compiled_step` of :func:`step_key` (see there)."""
    return compiled_step(step_key(cfg, model_cfg, mesh, loss_ext, fields, abstract_frozen))


# ----------------------------------------------------------------------------- evaluation


# ----------------------------------------------------------------------------- built-in hooks


# ----------------------------------------------------------------------------- the loop


@contextlib.contextmanager
def _signals(stop: _Stop, signals=(signal.SIGTERM, signal.SIGINT)):
    """Turn SIGTERM (pod preemption) and Ctrl-C into a request to checkpoint and stop."""
    def handler(signum, _frame):
        stop.requested = signal.Signals(signum).name

    old = {}
    try:
        for sig in signals:
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _train_steps(ctx: RunContext, hooks: Sequence[Hook], it, fns, compiled,
                 on_step: Callable[[int, dict], None] | None, stop: _Stop) -> str:
    """Step until ``cfg.steps`` or a SIGTERM / Ctrl-C; run the due hooks after each step.

    Returns:
      ``done``, ``preempted`` (SIGTERM) or ``interrupted`` (Ctrl-C).
    """
    cfg = ctx.cfg
    with _signals(stop):
        while ctx.step < cfg.steps and not stop.requested:
            batch_np = next(it)
            ctx.summary["batches"][ctx.step + 1] = zlib.crc32(batch_np["tokens"].tobytes())
            # each local [b, ...] field becomes [M, b / M, ...]: microbatch m holds the
            # consecutive rows m * b / M ... (m + 1) * b / M - 1
            batch = {name: jax.make_array_from_process_local_data(
                shd, batch_np[name].reshape(cfg.microbatches, -1, *batch_np[name].shape[1:]))
                for name, shd in fns.batch_sharding.items()}
            ctx.state, m = compiled(ctx.state, batch)
            ctx.step += 1
            host = {k: float(v) for k, v in jax.device_get(m).items()}
            host["step"] = ctx.step
            if not host["finite"]:
                if cfg.on_nonfinite is OnNonFinite.STOP:
                    good = ctx.checkpoints.latest_step()
                    raise NonFiniteLossError(
                        f"non-finite loss ({host['loss']}) or gradient norm "
                        f"({host['grad_norm']}) at step {ctx.step}; stopping. Last good "
                        f"checkpoint: {'none' if good is None else good} in "
                        f"{ctx.checkpoints.directory}")
                ctx.writer.log(f"step {ctx.step}: non-finite loss, update skipped")
            ctx.last = host
            if on_step is not None:
                on_step(ctx.step, host)
            for hook in hooks:
                if hook.due(ctx.step, cfg.steps):
                    run_hook(hook, ctx)
    if stop.requested:
        ctx.writer.log(f"{stop.requested}: saving a checkpoint at step {ctx.step}")
        return "interrupted" if stop.requested == "SIGINT" else "preempted"
    return "done"


def run(cfg: TrainConfig, *, on_step: Callable[[int, dict], None] | None = None,
        extensions: Sequence[Extension] | None = None,
        allow_config_change: Sequence[str] = ()) -> dict:
    """Train as ``cfg`` says; resume from the latest checkpoint in the output directory.

    Args:
      cfg: the run configuration.
      on_step: called after each step (before the hooks) with ``(step, host_metrics)``.
      extensions: the features plugged in (default: :func:`train.extensions.discover`).
      allow_config_change: config keys (or sections) that may differ from the saved config of
        the run being resumed (:data:`RESUME_KEYS`; any other difference there is refused).
    Returns:
      A summary: final step, status (``done``; ``preempted`` after SIGTERM, ``interrupted``
      after Ctrl-C, both with a checkpoint saved: run again to resume), last losses, eval
      losses, tokens/s, MFU, per-step batch fingerprints of this invocation (``batches``),
      paths, and the final ``state``. A run that had already finished returns its saved
      summary with ``already_done: True`` and no ``state`` (nothing is recomputed or written).
    """
    try:
        with _preemptible():  # SIGTERM outside the steps (loading, compiling, end of run)
            return _run(cfg, on_step, extensions, tuple(allow_config_change))
    except _Preempted:
        out = cfg.out if paths.is_url(cfg.out) else os.path.abspath(cfg.out)
        steps = checkpoint_steps(cfg.checkpoint.dir or paths.join(out, "checkpoints"))
        step = steps[-1] if steps else 0
        print(f"SIGTERM: stopped; the last checkpoint is at step {step}", file=sys.stderr,
              flush=True)
        return {"out": out, "status": "preempted", "step": step, "loss": None, "batches": {}}


class _Preempted(Exception):
    """SIGTERM arrived outside the training steps (where it is a stop request instead)."""


@contextlib.contextmanager
def _preemptible():
    def handler(signum, _frame):
        raise _Preempted()

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _run(cfg: TrainConfig, on_step, extensions, allow_change: tuple[str, ...] = ()) -> dict:
    if cfg.distributed:
        initialize_distributed()

    extensions = list(discover(cfg) if extensions is None else extensions)
    mesh = make_mesh(cfg.mesh)
    set_strict_sharding(cfg.mesh_strict)
    check_batch_fits(cfg.batch, cfg.microbatches, mesh, jax.process_count())
    data_lib.check_batch(cfg.batch, jax.process_count())

    fresh = absent_or_empty(cfg.out)
    # a new, empty or earlier jaxarith run directory (marked); never someone else's files
    if paths.is_url(cfg.out):  # an object store: the marker-last rules of jaxarith.io.paths
        fresh = None
        out = paths.claim_dir(cfg.out, kind="training run",
                              accept=("metrics.jsonl", "checkpoints"))
    else:
        out = claim_dir(cfg.out, kind="training run", accept=("metrics.jsonl", "checkpoints"),
                        inputs=[cfg.model.ref, cfg.init.ref])  # never inside an input model
    try:
        return _run_in(cfg, on_step, extensions, mesh, out, allow_change)
    except BaseException:
        if fresh is not None:  # refused before it wrote anything: leave no run directory behind
            unclaim(out, remove_dir=fresh)
        raise


def _run_in(cfg: TrainConfig, on_step, extensions, mesh, out: str,
            allow_change: tuple[str, ...]) -> dict:
    """:func:`_run` once the run directory ``out`` is claimed."""
    if cfg.log.wandb is not None and jax.process_index() == 0:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("log.wandb is set but the wandb package is not installed: "
                              "pip install 'jaxarith[wandb]'")
    if cfg.checkpoint.dir:  # before any work: someone's directory is not a checkpoint store
        check_checkpoint_dir(cfg.checkpoint.dir)
    model_cfg, model_dir = model_config(cfg, extensions)
    # strict: a dimension its mesh axis does not divide is an error naming it (else replicated)
    transformer.param_shardings(model_cfg, mesh, strict=cfg.mesh_strict)
    seq_len = cfg.data.seq_len
    if seq_len > model_cfg.context_length:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the model's context length "
                          f"{model_cfg.context_length}")
    tokenizer = tokenizer_for(cfg, model_dir)
    if len(tokenizer) > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's "
                          f"vocab_size is {model_cfg.vocab_size}")
    progress = cfg.log.progress and jax.process_index() == 0
    ckpt_dir = cfg.checkpoint.dir or paths.join(out, "checkpoints")
    done = finished_summary(cfg, out, ckpt_dir)
    config_dict = to_dict(cfg)
    resume_meta, resume_from = None, ""
    if checkpoint_steps(ckpt_dir):  # refuse a changed run before loading data and compiling
        with Checkpoints(ckpt_dir, keep=cfg.checkpoint.keep) as ckpts:
            newest = ckpts.newest_meta()  # an unreadable latest one: see restore_newest
            if newest is not None:
                latest, meta, _ = newest
                resume_meta, resume_from = meta, f"{ckpt_dir}/{latest}"
                check_resume(meta, config_dict, model_cfg, resume_from)
                check_config_unchanged(meta.get("config", {}), config_dict, allow_change, out)
    if done is not None:
        return report_finished(cfg, done, model_cfg, model_dir, mesh, ckpt_dir)
    if cfg.export.hf_dir and paths.is_url(cfg.export.hf_dir) and jax.process_index() == 0 \
            and not paths.exists(paths.join(out, "summary.json")):
        paths.check_upload(cfg.export.hf_dir, cfg.export.overwrite)  # refuse now
    elif cfg.export.hf_dir and os.path.exists(cfg.export.hf_dir) \
            and not paths.exists(paths.join(out, "summary.json")):
        # refuse now, not after the whole run
        check_destination(cfg.export.hf_dir, cfg.export.overwrite,
                          inputs=[out, model_dir, cfg.export.delta_tuned, cfg.export.delta_base])
    loss_ext = only_one(extensions, "loss")

    t0 = time.perf_counter()
    sources = data_lib.load_sources(cfg.data, tokenizer, process_index=jax.process_index(),
                                    process_count=jax.process_count())
    # a streamed source holds this process's share of documents: every process then mixes its
    # own windows (the other sources' windows split p::P) instead of striding a global stream
    local = any(s.process_local for s in sources) and jax.process_count() > 1
    if local:
        sources = data_lib.local_shares(sources, jax.process_index(), jax.process_count())
    streams = data_lib.stream_positions(sources)
    if resume_meta is not None:  # before compiling: a resume must read the same documents
        check_streams(resume_meta.get("data_streams", {}), streams, resume_from)
    eval_batch = cfg.batch // cfg.microbatches
    n_eval = cfg.eval.batches * eval_batch
    eval_sets = {s.name: eval_examples(s, n_eval) for s in sources if len(s.eval)}
    ds = data_lib.mixed_dataset(sources, cfg.data.seed)
    for ext in extensions:
        if ext.dataset is not None:
            ds = ext.dataset(cfg, sources, ds)
    fields = batch_fields(ds[0], seq_len, extensions)
    data_s = time.perf_counter() - t0
    frozen = load_frozen(cfg, model_cfg, mesh, extensions)
    abstract_frozen = _abstract(frozen)

    fns, compiled, info = run_step(cfg, model_cfg, mesh, loss_ext, fields, abstract_frozen)
    compile_s = info["compile_s"]
    evaluate = make_eval(model_cfg, mesh, eval_batch, seq_len, cfg.model.compute_dtype)

    fpt = metrics_lib.flops_per_token(model_cfg, seq_len)
    tokens_per_step = cfg.batch * seq_len
    summary: dict = {"out": out, "batches": {}}

    with Checkpoints(ckpt_dir, keep=cfg.checkpoint.keep,
                     async_save=cfg.checkpoint.async_save) as ckpts:
        start = ckpts.latest_step()
        if start is not None:
            try:  # the newest complete one: an unreadable newer one is set aside and reported
                start, state, data_state, _ = ckpts.restore_newest(fns.abstract_state,
                                                                   frozen=frozen)
            except CheckpointError as e:
                newest = ckpts.newest_meta()
                changed = config_changes(newest[1].get("config", {}), config_dict) \
                    if newest else ""
                raise CheckpointError(f"{e}; config changes since that checkpoint: "
                                      f"{changed or 'none'}") from None
        else:
            params = initial_params(cfg, model_cfg, mesh, progress, extensions)
            state, data_state, start = init_state(fns, params, mesh, frozen), None, 0
        it = data_lib.batch_iterator(ds, cfg.batch, process_index=jax.process_index(),
                                     process_count=jax.process_count(), state=data_state,
                                     local=local)
        # metrics, TensorBoard and the plot are written locally; for a URL `out` they are
        # staged and uploaded whole (object stores cannot append)
        mirror = paths.Mirror(out, pull=("metrics.jsonl", "tensorboard",
                                         metrics_lib.WANDB_ID_FILE)) \
            if jax.process_index() == 0 else None
        writer = metrics_lib.MetricsWriter(mirror.local if mirror else out, total_steps=cfg.steps,
                                           start_step=start, tensorboard=cfg.log.tensorboard,
                                           progress=progress, wandb=cfg.log.wandb,
                                           run_config=config_dict,
                                           sync=mirror.push if mirror else None)
        writer.log(_startup_message(cfg, model_cfg, mesh, info, fpt, start, data_s, compile_s,
                                    sources))
        if jax.process_index() == 0:
            paths.write_text(paths.join(out, "config.json"), json.dumps(config_dict, indent=2))

        def save() -> None:
            ckpts.save(ctx.step, ctx.state, it.get_state(),
                       {"config": config_dict, "model_config": model_cfg.to_hf(),
                        "step": ctx.step, "metrics": ctx.last, "data_streams": streams})

        ctx = RunContext(cfg=cfg, model_cfg=model_cfg, mesh=mesh, out=out, step=start,
                         state=state, evaluate=evaluate, eval_sets=eval_sets, writer=writer,
                         checkpoints=ckpts, summary=summary, save=save, tokenizer=tokenizer)
        thr = metrics_lib.Throughput(tokens_per_step, fpt,
                                     metrics_lib.total_peak_flops(mesh.devices.size),
                                     mesh.devices.size, start_step=start)
        hooks = [*default_hooks(cfg, thr), *(h for e in extensions for h in e.hooks),
                 *end_hooks(cfg)]
        try:
            status = _train_steps(ctx, hooks, it, fns, compiled, on_step, _Stop())
            save()
            if status == "done":
                ctx.final = True
                for hook in hooks:
                    if hook.at_end:
                        run_hook(hook, ctx)
            ckpts.wait()
        finally:
            writer.close()
            if mirror is not None:
                mirror.close()

    state = ctx.state
    summary.update(step=ctx.step, status=status, loss=ctx.last.get("loss"))
    if status == "done" and cfg.export.hf_dir:
        keep = start >= cfg.steps and paths.exists(cfg.export.hf_dir) \
            and not cfg.export.overwrite
        if not keep:
            summary["export_hf"] = export_hf(cfg, model_cfg, model_dir, state)
    write_summary(paths.join(out, "summary.json"), summary)
    summary["state"] = state  # the final TrainState (not serialised)
    return summary


def _startup_message(cfg, model_cfg, mesh, info, fpt, start, data_s, compile_s, sources) -> str:
    mem = info["memory"]
    gib = lambda n: f"{n / 2**30:.3f} GiB"
    lines = [
        f"model: {model_cfg.arch} {transformer.num_params(model_cfg) / 1e6:.2f}M params, "
        f"mesh {sharding.mesh_spec_string(mesh)} ({mesh.devices.size} devices), "
        f"batch {cfg.batch} x {cfg.data.seq_len} tokens, {cfg.microbatches} microbatch(es)",
        "data: " + ", ".join(f"{s.name} w={s.weight:g} ({len(s.train)} train / {len(s.eval)} "
                             f"eval windows)" for s in sources) + f" [{data_s:.1f} s]",
        f"compiled step in {compile_s:.1f} s: XLA flops/step {sci(info['flops'])}, "
        f"formula flops/step {fpt * cfg.batch * cfg.data.seq_len:.3e} "
        f"(6N + 6 L T d_attn per token)",
        "memory per device: " + (", ".join(f"{k.replace('_size_in_bytes', '')} {gib(v)}"
                                           for k, v in mem.items()) or "n/a"),
    ]
    if start:
        lines.append(f"resumed from the checkpoint at step {start}")
    lines.append(metrics_lib.peak_description(mesh.devices.size))
    return "\n".join(lines)
