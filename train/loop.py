"""The training loop: resolve the model, build data, compile the step once, train, evaluate,
checkpoint, export.

``run(cfg)`` is what ``python -m train CONFIG.yaml`` and ``jaxarith train`` call. Restarting the
same command resumes from the latest checkpoint in ``OUT/checkpoints`` (state, optimizer, average,
data iterator position), so the resumed run ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import sys
import time
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxarith import data as data_lib
from jaxarith import sharding
from jaxarith.errors import ConfigError, JaxarithError
from jaxarith.models import transformer
from jaxarith.models.config import ModelConfig, config_from_hf, load_config
from train import metrics as metrics_lib
from train.checkpoint import Checkpoints
from train.config import OnNonFinite, TrainConfig, to_dict
from train.step import (
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


# ----------------------------------------------------------------------------- model & data


def model_config(cfg: TrainConfig) -> tuple[ModelConfig, str | None]:
    """The model config and the directory of the starting checkpoint (None from scratch)."""
    m = cfg.model
    if cfg.init.enabled:
        from train.init import start_config

        return start_config(cfg.init)
    if not m.ref:
        return config_from_hf({"model_type": m.arch, **m.config}), None
    from jaxarith.refs import RefKind, ref_kind

    if ref_kind(m.ref) is RefKind.ORBAX:
        return load_config(m.ref), os.fspath(m.ref)
    from jaxarith.convert.hf import resolve_hf_dir

    directory = resolve_hf_dir(m.ref)
    return load_config(directory), directory


def initial_params(cfg: TrainConfig, model_cfg: ModelConfig, mesh, progress: bool):
    """Start weights: loaded from ``model.ref`` onto the mesh, or random (``seed``)."""
    if cfg.init.enabled:
        from train.init import start_params

        return start_params(cfg.init, mesh, cfg.seed, progress=progress)
    if cfg.model.ref:
        from jaxarith.refs import load_model

        return load_model(cfg.model.ref, mesh=mesh, dtype=jnp.float32, progress=progress).params
    return scratch_params(model_cfg, cfg.seed, mesh)


def tokenizer_for(cfg: TrainConfig, model_dir: str | None):
    """The tokenizer: ``bundled``, a directory, or (default) the starting model's."""
    name = cfg.model.tokenizer or model_dir
    if not name or name == "bundled":
        from jaxarith.assets import bundled_tokenizer

        return bundled_tokenizer()
    from jaxarith.refs import load_tokenizer

    return load_tokenizer(name)


def _local_rows(x: np.ndarray) -> np.ndarray:
    return x[jax.process_index()::jax.process_count()]


# ----------------------------------------------------------------------------- compiled pieces


@functools.lru_cache(maxsize=4)
def compiled_step(model_cfg, mesh, optimizer, schedule, batch, seq_len, microbatches, average,
                  skip_nonfinite, compute_dtype, remat):
    """Build and AOT-compile the train step (cached in-process by every input that shapes it,
    so a resumed or repeated run in the same process does not compile again).

    Returns:
      (StepFns, compiled step, info) with ``info`` holding XLA's flops, memory analysis and
      ``compile_s``.
    """
    sched = schedule.build()
    dtype = jnp.dtype(compute_dtype)
    fns = build_step(model_cfg, mesh, tx=make_optimizer(optimizer, sched), schedule=sched,
                     batch=batch, seq_len=seq_len, microbatches=microbatches,
                     loss_fn=next_token_loss_fn(model_cfg, dtype=dtype, remat=remat),
                     average=(average.kind, average.options()), skip_nonfinite=skip_nonfinite)
    t0 = time.perf_counter()
    compiled, info = compile_step(fns, mesh)
    info["compile_s"] = time.perf_counter() - t0
    return fns, compiled, info


# ----------------------------------------------------------------------------- evaluation


@functools.lru_cache(maxsize=4)
def make_eval(model_cfg: ModelConfig, mesh, batch: int, seq_len: int, compute_dtype: str):
    """``evaluate(params, windows) -> mean NLL`` over ``[batch, seq_len]`` batches (jitted)."""
    dtype = jnp.dtype(compute_dtype)
    shd = sharding.named_sharding(mesh, ("batch", "seq"), (batch, seq_len))
    pshd = transformer.param_shardings(model_cfg, mesh)

    def fn(params, tokens, mask):
        return transformer.next_token_loss(params, model_cfg, tokens, mask, dtype=dtype)

    jitted = jax.jit(fn, in_shardings=(pshd, shd, shd))

    def evaluate(params, windows: np.ndarray) -> float:
        total, count = 0.0, 0.0
        with jax.set_mesh(mesh):
            for s in range(0, len(windows), batch):
                chunk = windows[s: s + batch]
                tokens = np.zeros((batch, seq_len), np.int32)
                mask = np.zeros((batch, seq_len), np.int32)
                tokens[: len(chunk)], mask[: len(chunk)] = chunk, 1
                t = jax.make_array_from_process_local_data(shd, _local_rows(tokens))
                m = jax.make_array_from_process_local_data(shd, _local_rows(mask))
                nll, n = jitted(params, t, m)
                total, count = total + float(nll), count + float(n)
        return total / max(count, 1.0)

    return evaluate


def _evaluate_all(evaluate, state, eval_sets: dict, with_average: bool) -> dict:
    out = {}
    for name, windows in eval_sets.items():
        out[f"eval/{name}/loss"] = evaluate(state.params, windows)
        if with_average and state.average is not None:
            out[f"eval_avg/{name}/loss"] = evaluate(state.average.value(), windows)
    return out


# ----------------------------------------------------------------------------- the loop


@contextlib.contextmanager
def _signals(stop: _Stop):
    """Turn SIGTERM (pod preemption) and Ctrl-C into a request to checkpoint and stop."""
    def handler(signum, _frame):
        stop.requested = signal.Signals(signum).name

    old = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def run(cfg: TrainConfig, *, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train as ``cfg`` says; resume from the latest checkpoint in the output directory.

    Args:
      cfg: the run configuration.
      on_step: called after each step with ``(step, host_metrics)`` (tests, custom hooks).
    Returns:
      A summary: final step, status (``done`` / ``preempted``), last losses, eval losses,
      tokens/s, MFU, per-step batch fingerprints of this invocation (``batches``), paths, and
      the final ``state``.
    """
    if cfg.distributed:
        jax.distributed.initialize()
    from jaxarith.sharding import make_mesh

    mesh = make_mesh(cfg.mesh)
    check_batch_fits(cfg.batch, cfg.microbatches, mesh, jax.process_count())
    data_lib.check_batch(cfg.batch, jax.process_count())
    out = os.path.abspath(cfg.out)
    os.makedirs(out, exist_ok=True)
    model_cfg, model_dir = model_config(cfg)
    seq_len = cfg.data.seq_len
    if seq_len > model_cfg.context_length:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the model's context length "
                          f"{model_cfg.context_length}")
    tokenizer = tokenizer_for(cfg, model_dir)
    if len(tokenizer) > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's "
                          f"vocab_size is {model_cfg.vocab_size}")
    progress = cfg.log.progress and jax.process_index() == 0
    if cfg.export.hf_dir and not cfg.export.overwrite and os.path.exists(cfg.export.hf_dir) \
            and not os.path.exists(os.path.join(out, "summary.json")):
        from jaxarith.atomic import check_destination

        check_destination(cfg.export.hf_dir)  # refuse now, not after the whole run

    t0 = time.perf_counter()
    sources = data_lib.load_sources(cfg.data, tokenizer)
    eval_batch = cfg.batch // cfg.microbatches
    n_eval = cfg.eval.batches * eval_batch
    eval_sets = {s.name: data_lib.eval_windows(s, n_eval) for s in sources if len(s.eval)}
    data_s = time.perf_counter() - t0

    fns, compiled, info = compiled_step(
        model_cfg, mesh, cfg.optimizer, cfg.schedule, cfg.batch, seq_len, cfg.microbatches,
        cfg.average, cfg.on_nonfinite is OnNonFinite.SKIP, cfg.model.compute_dtype,
        cfg.model.remat)
    compile_s = info["compile_s"]
    evaluate = make_eval(model_cfg, mesh, eval_batch, seq_len, cfg.model.compute_dtype)

    fpt = metrics_lib.flops_per_token(model_cfg, seq_len)
    tokens_per_step = cfg.batch * seq_len
    ckpt_dir = cfg.checkpoint.dir or os.path.join(out, "checkpoints")
    config_dict = to_dict(cfg)
    summary: dict = {"out": out, "batches": {}}

    with Checkpoints(ckpt_dir, keep=cfg.checkpoint.keep,
                     async_save=cfg.checkpoint.async_save) as ckpts:
        start = ckpts.latest_step()
        if start is not None:
            state, data_state, _ = ckpts.restore(fns.abstract_state)
        else:
            params = initial_params(cfg, model_cfg, mesh, progress)
            state, data_state, start = init_state(fns, params, mesh), None, 0
        ds = data_lib.mixed_dataset(sources, cfg.data.seed)
        it = data_lib.batch_iterator(ds, cfg.batch, process_index=jax.process_index(),
                                     process_count=jax.process_count(), state=data_state)
        writer = metrics_lib.MetricsWriter(out, total_steps=cfg.steps, start_step=start,
                                           tensorboard=cfg.log.tensorboard, progress=progress)
        writer.log(_startup_message(cfg, model_cfg, mesh, info, fpt, start, data_s, compile_s,
                                    sources))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config_dict, f, indent=2)

        def save(step: int, last_metrics: dict) -> None:
            ckpts.save(step, state, it.get_state(),
                       {"config": config_dict, "step": step, "metrics": last_metrics})

        stop = _Stop()
        thr = metrics_lib.Throughput(tokens_per_step, fpt, metrics_lib.device_peak_flops(),
                                     mesh.devices.size)
        already_done = start >= cfg.steps
        last: dict = {}
        status = "done"
        step = start
        try:
            with _signals(stop):
                while step < cfg.steps:
                    batch_np = next(it)
                    tokens = batch_np["tokens"]
                    summary["batches"][step + 1] = zlib.crc32(tokens.tobytes())
                    batch = {
                        name: jax.make_array_from_process_local_data(
                            shd, batch_np[name].reshape(cfg.microbatches, -1,
                                                        *batch_np[name].shape[1:]))
                        for name, shd in fns.batch_sharding.items()}
                    state, m = compiled(state, batch)
                    step += 1
                    thr.tick()
                    host = {k: float(v) for k, v in jax.device_get(m).items()}
                    host["step"] = step
                    if not host["finite"]:
                        if cfg.on_nonfinite is OnNonFinite.STOP:
                            good = ckpts.latest_step()
                            raise NonFiniteLossError(
                                f"non-finite loss ({host['loss']}) or gradient norm "
                                f"({host['grad_norm']}) at step {step}; stopping. Last good "
                                f"checkpoint: {'none' if good is None else good} in {ckpt_dir}")
                        writer.log(f"step {step}: non-finite loss, update skipped")
                    last = host
                    if on_step is not None:
                        on_step(step, host)
                    if step % cfg.log.every == 0 or step == cfg.steps:
                        rec = {"step": step, "loss": host["loss"], "lr": host["lr"],
                               "grad_norm": host["grad_norm"], **thr.read()}
                        writer.write(rec)
                        writer.progress(step, host["loss"], rec["tokens_per_s"])
                        summary["tokens_per_s"], summary["mfu"] = rec["tokens_per_s"], rec["mfu"]
                    if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.steps:
                        ev = _evaluate_all(evaluate, state, eval_sets, True)
                        writer.write({"step": step, **ev})
                        writer.log(_fmt_eval(step, ev))
                    if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                        save(step, host)
                    if stop.requested:
                        status = "preempted"
                        writer.log(f"{stop.requested}: saving a checkpoint at step {step}")
                        break
            save(step, last)
            ckpts.wait()
        finally:
            writer.close()

    summary.update(step=step, status=status, loss=last.get("loss"))
    if status == "done":
        summary.update(_finish(cfg, model_cfg, model_dir, state, evaluate, eval_sets, out,
                               already_done))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "batches"}, f, indent=2)
    summary["state"] = state  # the final TrainState (not serialised)
    return summary


def _finish(cfg, model_cfg, model_dir, state, evaluate, eval_sets, out,
            already_done: bool = False) -> dict:
    """End of a completed run: final evaluation, loss plot, optional HF export.

    Re-running a finished run re-evaluates but keeps an existing export (unless
    ``export.overwrite``)."""
    res: dict = {}
    if cfg.eval.at_end and eval_sets:
        ev = _evaluate_all(evaluate, state, eval_sets, True)
        res["eval"] = ev
        if jax.process_index() == 0:
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": int(state.step), **ev}) + "\n")
            print(_fmt_eval(int(state.step), ev), file=sys.stderr, flush=True)
    if cfg.log.plot and jax.process_index() == 0:
        res["plot"] = metrics_lib.plot_losses(os.path.join(out, "metrics.jsonl"),
                                              os.path.join(out, "loss.png"))
    keep = already_done and os.path.exists(cfg.export.hf_dir) and not cfg.export.overwrite
    if cfg.export.hf_dir and not keep:
        from train.export import export_hf

        res["export_hf"] = export_hf(cfg, model_cfg, model_dir, state)
    return res


def _sci(x) -> str:
    return "n/a" if x is None else f"{x:.3e}"


def _fmt_eval(step: int, ev: dict) -> str:
    return f"eval @ {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in ev.items())


def _startup_message(cfg, model_cfg, mesh, info, fpt, start, data_s, compile_s, sources) -> str:
    mem = info["memory"]
    gib = lambda n: f"{n / 2**30:.3f} GiB"
    lines = [
        f"model: {model_cfg.arch} {transformer.num_params(model_cfg) / 1e6:.2f}M params, "
        f"mesh {sharding.mesh_spec_string(mesh)} ({mesh.devices.size} devices), "
        f"batch {cfg.batch} x {cfg.data.seq_len} tokens, {cfg.microbatches} microbatch(es)",
        "data: " + ", ".join(f"{s.name} w={s.weight:g} ({len(s.train)} train / {len(s.eval)} "
                             f"eval windows)" for s in sources) + f" [{data_s:.1f} s]",
        f"compiled step in {compile_s:.1f} s: XLA flops/step {_sci(info['flops'])}, "
        f"formula flops/step {fpt * cfg.batch * cfg.data.seq_len:.3e} "
        f"(6N + 6 L T d_attn per token)",
        "memory per device: " + (", ".join(f"{k.replace('_size_in_bytes', '')} {gib(v)}"
                                           for k, v in mem.items()) or "n/a"),
    ]
    if start:
        lines.append(f"resumed from the checkpoint at step {start}")
    if math.isnan(metrics_lib.device_peak_flops()):
        lines.append("MFU: unknown device peak")
    return "\n".join(lines)
