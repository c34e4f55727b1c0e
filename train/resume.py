"""Resuming a run: what a checkpoint must agree with (model, settings, streams), the
checkpoint store's own checks, and a finished run reported without training again."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Sequence

import jax

from jaxarith import sharding
from jaxarith.configfile import short
from jaxarith.errors import CheckpointError, ConfigError
from jaxarith.io import paths
from jaxarith.io.atomic import MARKER, check_destination
from jaxarith.models import transformer
from jaxarith.models.config import ModelConfig, config_from_hf
from train.checkpoint import Checkpoints
from train.config import TrainConfig
from train.export import export_hf
from train.step import (
    build_step,
    make_optimizer,
    next_token_loss_fn,
)


def absent_or_empty(path: str) -> bool | None:
    """True: ``path`` does not exist; False: an empty directory; None: anything else."""
    if not os.path.lexists(path):
        return True
    return False if os.path.isdir(path) and not os.listdir(path) else None


def unclaim(out: str, *, remove_dir: bool) -> None:
    """Undo :func:`claim_dir` of a run that stopped before writing anything but the marker."""
    if jax.process_index() != 0:
        return
    with contextlib.suppress(OSError):
        if os.listdir(out) == [MARKER]:
            os.remove(os.path.join(out, MARKER))
            if remove_dir:
                os.rmdir(out)


def check_checkpoint_dir(ckpt_dir: str) -> None:
    """Refuse a ``checkpoint.dir`` that holds anything but Orbax checkpoints: Orbax takes every
    numeric subdirectory for a checkpoint step (and deletes those beyond ``keep``)."""
    if not os.path.lexists(ckpt_dir):
        return
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f"checkpoint.dir={ckpt_dir}: not a directory")

    foreign = []
    for name in sorted(os.listdir(ckpt_dir)):
        path = os.path.join(ckpt_dir, name)
        if name == MARKER or ".orbax-checkpoint-tmp" in name or name.startswith("unreadable-"):
            continue
        if not (name.isdigit() and os.path.isdir(path)
                and os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA"))):
            foreign.append(name)
    if foreign:
        raise ConfigError(f"checkpoint.dir={ckpt_dir} holds entries that are not checkpoints of "
                          f"a run ({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''});"
                          " the checkpointer would take numeric directories for its own and "
                          "delete them: give a new or empty directory")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict, keys: Sequence[str] | None = None,
                    limit: int = 8) -> str:
    """``key: old -> new`` for the dotted keys that differ (``out``/``steps`` aside)."""
    a, b = flatten(old), flatten(new)
    names = sorted(set(a) | set(b)) if keys is None else keys
    diffs = [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in names
             if a.get(k) != b.get(k) and k not in ("out", "steps", "schedule.total_steps")]
    more = f" (and {len(diffs) - limit} more)" if len(diffs) > limit else ""
    return ", ".join(diffs[:limit]) + more


def saved_model_config(meta: dict) -> ModelConfig | None:
    if "model_config" in meta:
        return config_from_hf(meta["model_config"])
    m = meta.get("config", {}).get("model", {})
    if m.get("arch") and not m.get("ref"):  # an older checkpoint of a scratch run
        return config_from_hf({"model_type": m["arch"], **m.get("config", {})})
    return None


def check_resume(meta: dict, config_dict: dict, model_cfg: ModelConfig, where: str) -> None:
    """Refuse to resume from a checkpoint of a different model or state layout, naming what
    changed (before orbax tries, and fails with a tree dump)."""
    old_cfg = saved_model_config(meta)
    if old_cfg is not None:
        shapes = lambda c: {sharding.path_str(p): tuple(x.shape) for p, x in
                            jax.tree_util.tree_leaves_with_path(transformer.abstract_params(c))}
        old, new = shapes(old_cfg), shapes(model_cfg)
        if old != new:
            changed = config_changes(old_cfg.to_hf(), model_cfg.to_hf())
            tensors = [f"{k} {old.get(k, 'absent')} -> {new.get(k, 'absent')}"
                       for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            raise CheckpointError(
                f"cannot resume from {where}: it holds a different model ({changed or 'arch'}; "
                f"tensors {', '.join(tensors[:3])}{' ...' if len(tensors) > 3 else ''}). Resume "
                "with the model config it was written with, or train into a new out")
    saved = meta.get("config", {})
    layout = config_changes(saved, config_dict, ["average.kind", "average.k",
                                                  "average.offload"]) if saved else ""
    clip = lambda c: bool(c.get("optimizer", {}).get("clip_norm", 1.0))
    if saved and clip(saved) != clip(config_dict):
        layout = ", ".join(filter(None, [layout, "optimizer.clip_norm: switched on/off"]))
    if layout:
        raise CheckpointError(f"cannot resume from {where}: the train state's layout changed "
                              f"({layout}). Resume with the old setting, or use a new out")


# The settings that make a run what it is: a resume may not change them silently.
RESUME_KEYS = ("model", "optimizer", "data", "seed", "init")


def check_config_unchanged(saved: dict, config_dict: dict, allow: Sequence[str],
                           out: str) -> None:
    """Refuse to resume (or to report as done) a run whose :data:`RESUME_KEYS` settings differ
    from its saved config, naming the keys, unless each is listed in ``allow`` (a key or a
    section: ``data.sources.code``)."""
    if not saved:
        return

    a, b = flatten(saved), flatten(config_dict)
    if "data" in saved and "data.packing" not in a:  # saved before data.packing existed
        a["data.packing"] = "stream"
    allowed = lambda k: any(k == x or k.startswith(x + ".") for x in allow)
    keys = [k for k in sorted(set(a) | set(b))
            if k.split(".")[0] in RESUME_KEYS and a.get(k) != b.get(k) and not allowed(k)]
    if keys:
        diffs = [f"{k}: {short(a.get(k, '(unset)'), 60)} -> {short(b.get(k, '(unset)'), 60)}"
                 for k in keys[:6]]
        more = f" (and {len(keys) - 6} more)" if len(keys) > 6 else ""
        raise ConfigError(f"cannot resume the run in {out}: its config differs from the saved "
                          f"one in {', '.join(diffs)}{more}. Resume with the saved settings, "
                          f"pass --allow-config-change {','.join(keys)}, or train into a new out")


def check_streams(saved: dict, current: dict, where: str) -> None:
    """Refuse to resume when a streamed source reads other documents than when the checkpoint
    was written (the iterator position would then point into other windows): another
    ``max_docs``, ``eval_fraction``, number of processes, or a stream that changed length.
    The checkpoint holds process 0's position; every process reads by the same rule."""
    for name, pos in saved.items():
        now = current.get(name)
        if now is None:
            raise CheckpointError(f"cannot resume from {where}: data source {name!r} was read "
                                  "as a stream and is not one now")
        keys = ("documents", "eval_documents", "process_count")
        diff = [f"{k} {pos.get(k)} -> {now.get(k)}" for k in keys if pos.get(k) != now.get(k)]
        if diff:
            raise CheckpointError(f"cannot resume from {where}: the stream of data source "
                                  f"{name!r} gives other documents ({', '.join(diff)}); resume "
                                  "with the same max_docs, eval_fraction and processes")


def checkpoint_steps(ckpt_dir: str) -> list[int]:
    """The steps of the complete checkpoints in ``ckpt_dir`` (orbax commits ``DIR/<step>``;
    its temporaries have other names)."""
    if paths.is_url(ckpt_dir):
        return sorted(int(n) for n in paths.listdir(ckpt_dir) if n.isdigit())
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir)
                  if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n)))


def finished_summary(cfg: TrainConfig, out: str, ckpt_dir: str) -> dict | None:
    """The saved summary if the run in ``out`` already completed ``cfg.steps`` (else None).

    Raises:
      ConfigError: the checkpoints are past ``cfg.steps`` (steps was lowered).
    """
    steps = checkpoint_steps(ckpt_dir)
    if not steps:
        return None
    if steps[-1] > cfg.steps:
        raise ConfigError(f"steps={cfg.steps} but {ckpt_dir} already has a checkpoint at step "
                          f"{steps[-1]}: raise steps to extend the run, or use a new out")
    path = paths.join(out, "summary.json")
    if steps[-1] < cfg.steps or not paths.exists(path):
        return None
    try:
        saved = json.loads(paths.read_text(path))
    except (OSError, json.JSONDecodeError):
        return None
    if saved.get("status") != "done" or saved.get("step") != cfg.steps:
        return None
    return saved


def report_finished(cfg: TrainConfig, saved: dict, model_cfg: ModelConfig, model_dir,
                     mesh, ckpt_dir: str) -> dict:
    """A finished run is left untouched: report it (no eval, no compile, no new metrics).

    Only an export the run has not written yet (``--export-hf`` to a new directory) is done,
    from the last checkpoint, and recorded in ``summary.json``."""
    where = saved.get("out", cfg.out)
    if jax.process_index() == 0:
        print(f"the run in {where} already finished at step {saved['step']} (raise steps to "
              "extend it); nothing to train", file=sys.stderr, flush=True)
    res = {**saved, "already_done": True, "batches": {}}
    hf = cfg.export.hf_dir
    if hf and paths.is_url(hf) and (hf != saved.get("export_hf") or cfg.export.overwrite):
        raise ConfigError(f"the run in {where} already finished; exporting it to a URL "
                          f"({hf}) afterwards is not supported: export to a local directory")
    if hf and (paths.absolute(hf) != saved.get("export_hf") or cfg.export.overwrite):
        check_destination(hf, cfg.export.overwrite,
                          inputs=[where, model_dir, cfg.export.delta_tuned, cfg.export.delta_base])
        sched = cfg.schedule.build()
        fns = build_step(model_cfg, mesh, tx=make_optimizer(cfg.optimizer, sched),
                         schedule=sched, batch=cfg.batch, seq_len=cfg.data.seq_len,
                         microbatches=cfg.microbatches, loss_fn=next_token_loss_fn(model_cfg),
                         average=cfg.average.in_step())
        with Checkpoints(ckpt_dir, keep=cfg.checkpoint.keep) as ckpts:
            state, _, _ = ckpts.restore(fns.abstract_state)
        res["export_hf"] = export_hf(cfg, model_cfg, model_dir, state)
        write_summary(paths.join(where, "summary.json"),
                       {**saved, "export_hf": res["export_hf"]})
    return res


def write_summary(path: str, summary: dict) -> None:
    if jax.process_index() != 0:
        return
    paths.write_text(path, json.dumps({k: v for k, v in summary.items()
                                       if k not in ("batches", "state")}, indent=2))
