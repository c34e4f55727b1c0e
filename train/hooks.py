"""The training loop's built-in hooks (see :mod:`train.extensions`): metrics every
``log.every`` steps, evaluation, step- and time-based checkpoints, the loss plot."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import jax
import numpy as np

from train import metrics as metrics_lib
from train.config import TrainConfig
from train.extensions import Hook, RunContext


def log_metrics_hook(thr: metrics_lib.Throughput) -> Callable[[RunContext], dict]:
    """The train-metrics record: loss, lr, grad_norm, the loss function's own metrics and
    throughput; updates the progress bar."""
    skip = {"step", "loss", "lr", "grad_norm", "tokens", "finite"}

    def fn(ctx: RunContext) -> dict | None:
        h = ctx.last
        if not h:  # no step ran in this invocation
            return None
        rec = {"loss": h["loss"], "lr": h["lr"], "grad_norm": h["grad_norm"],
               **{k: v for k, v in h.items() if k not in skip}, **thr.read(ctx.step)}
        ctx.writer.progress(ctx.step, h["loss"], rec["tokens_per_s"])
        ctx.summary["tokens_per_s"], ctx.summary["mfu"] = rec["tokens_per_s"], rec["mfu"]
        return rec

    return fn


def eval_hook(ctx: RunContext) -> dict | None:
    """Held-out loss of every source, for the params and (if any) the averaged params."""
    if ctx.final and not ctx.cfg.eval.at_end or not ctx.eval_sets:
        return None
    ev = {}
    for name, examples in ctx.eval_sets.items():
        ev[f"eval/{name}/loss"] = ctx.evaluate(ctx.state.params, examples)
        if ctx.state.average is not None:
            ev[f"eval_avg/{name}/loss"] = ctx.evaluate(ctx.state.average.value(), examples)
    ctx.writer.log(fmt_eval(ctx.step, ev))
    if ctx.final:
        ctx.summary["eval"] = ev
    return ev


def lm_eval_hook(cfg: TrainConfig) -> Callable[[RunContext], dict | None]:
    """lm-eval tasks (``eval.lm_eval``) on the live parameters: ``lm_eval/TASK/METRIC`` records.

    The task names are checked when the hook is made (at the start of the run, on every
    process alike). The model is :meth:`JaxarithLM.from_params` over the current params on the
    run's mesh; its scoring is collective, so with several processes process 0 runs lm-eval and
    the others follow it (an error on process 0 ends every process).
    """
    # lm-eval is the optional eval extra: imported only when a config asks for its tasks
    from jaxarith.eval.lmeval.run import task_manager

    c = cfg.eval.lm_eval
    tm = task_manager(list(c.tasks), c.include_path)
    limit = None if c.limit is None else int(c.limit) if c.limit >= 1 else float(c.limit)

    def fn(ctx: RunContext) -> dict | None:
        if ctx.final and not ctx.cfg.eval.at_end:
            return None
        # the eval extra (see above)
        import lm_eval

        # registers model="jaxarith" with lm-eval, which needs the extra
        from jaxarith.eval.lmeval import JaxarithLM

        lm = JaxarithLM.from_params(ctx.model_cfg, ctx.state.params, ctx.tokenizer,
                                    mesh=ctx.mesh, name=f"{ctx.out}@step{ctx.step}",
                                    batch_size=c.batch_size,
                                    dtype=str(ctx.cfg.model.compute_dtype))
        if jax.process_index() != 0:
            lm.follow()
            return None
        with lm.leading():
            res = lm_eval.simple_evaluate(model=lm, tasks=list(c.tasks), task_manager=tm,
                                          limit=limit, num_fewshot=c.num_fewshot,
                                          bootstrap_iters=0, log_samples=False)
        rec = {f"lm_eval/{task}/{k.split(',')[0]}": float(v)
               for task, metrics in res["results"].items() for k, v in metrics.items()
               if "," in k and "_stderr" not in k and isinstance(v, int | float)}
        ctx.writer.log(fmt_eval(ctx.step, rec))
        if ctx.final:
            ctx.summary["lm_eval"] = rec
        return rec

    return fn


def checkpoint_hook(ctx: RunContext) -> None:
    ctx.save()


# the clock of time-based checkpoints (seconds; tests replace it with a fake one)
checkpoint_clock = time.monotonic


def timed_checkpoint_hook(minutes: float) -> Callable[[RunContext], None]:
    """Save when ``minutes`` have passed since the last time-based save (or since this hook was
    made, at the start of the run). Saving is collective, so with several processes process
    0's clock decides and its decision is broadcast (one tiny collective per step)."""
    last = [checkpoint_clock()]

    def fn(ctx: RunContext) -> None:
        now = checkpoint_clock()
        due = now - last[0] >= minutes * 60
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
        if due:
            ctx.save()
            last[0] = now

    return fn


def plot_hook(ctx: RunContext) -> None:
    if jax.process_index() == 0:
        local = os.path.dirname(ctx.writer.path)  # the run directory, or its local staging
        ctx.summary["plot"] = metrics_lib.plot_losses(os.path.join(local, "metrics.jsonl"),
                                                      os.path.join(local, "loss.png"))


def default_hooks(cfg: TrainConfig, thr: metrics_lib.Throughput) -> list[Hook]:
    """Metrics every ``log.every`` steps, eval every ``eval.every`` (and at the end), lm-eval
    tasks every ``eval.lm_eval.every`` (and at the end) when ``eval.lm_eval.tasks`` are given,
    checkpoints every ``checkpoint.every`` steps and every ``checkpoint.every_minutes`` (the
    loop also saves at the end and on preemption)."""
    return [Hook(name="log", every=cfg.log.every, fn=log_metrics_hook(thr), at_end=True),
            Hook(name="eval", every=cfg.eval.every, fn=eval_hook, at_end=True),
            *([Hook(name="lm_eval", every=cfg.eval.lm_eval.every, fn=lm_eval_hook(cfg),
                    at_end=True)] if cfg.eval.lm_eval.tasks else []),
            Hook(name="checkpoint", every=cfg.checkpoint.every, fn=checkpoint_hook),
            *([Hook(name="checkpoint_time", every=1,
                    fn=timed_checkpoint_hook(cfg.checkpoint.every_minutes))]
              if cfg.checkpoint.every_minutes > 0 else [])]


def end_hooks(cfg: TrainConfig) -> list[Hook]:
    """Hooks after the extensions' ones: the loss plot at the end."""
    return [Hook(name="plot", every=0, fn=plot_hook, at_end=True)] if cfg.log.plot else []


def run_hook(hook: Hook, ctx: RunContext) -> None:
    rec = hook.fn(ctx)
    if rec:
        ctx.writer.write({"step": ctx.step, **rec})


def sci(x) -> str:
    return "n/a" if x is None else f"{x:.3e}"


def fmt_eval(step: int, ev: dict) -> str:
    return f"eval @ {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in ev.items())
