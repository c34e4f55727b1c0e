"""Inheritune vs distillation at small scale (the seed study "Pre-training Small Base LMs with
Fewer Tokens", Sanyal et al. 2024, compares the two ways of using a larger trained model).

Stages (cached in ``DIR``: a stage whose model export exists is skipped; rerun to resume):

0. ``teacher``: a Llama of ``teacher.config`` (e.g. 4 layers) trained ``teacher.steps`` steps.
1-4. four students of ``student.layers`` layers (the teacher's width, vocabulary and recipe),
   each trained ``student.steps`` steps on the same data stream (same seed, batch, windows):

   ============== =============================================== ==========================
   arm            start weights                                   objective
   ============== =============================================== ==========================
   scratch        fresh (``init_params``, the run's seed)         next-token CE
   inherit        the teacher's first ``student.layers`` blocks,  next-token CE
                  embeddings, final norm and head (``init:``)
   distill        fresh (the same as ``scratch``)                 ``alpha KL + (1-alpha) CE``
                                                                  with the live teacher
   inherit_distill the teacher's first blocks (as ``inherit``)    as ``distill``
   ============== =============================================== ==========================

5. ``eval``: every model (teacher included) on the same held-out windows of every data source:
   the pooled next-token NLL, and the pooled forward KL(teacher || student) at temperature 1.

Outputs: ``models/{teacher,scratch,inherit,distill,inherit_distill}`` (HF exports),
``stages/<name>/`` (training runs with ``metrics.jsonl``), ``results.json``, ``report.md``,
``loss_curves.png``.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from jaxarith.distill.losses import DistillLoss, per_token
from jaxarith.errors import ConfigError, JaxarithError
from jaxarith.io.refs import load_model
from jaxarith.models import forward
from jaxarith.models.transformer import num_params
from train.config import from_dict
from train.experiments.common import (
    Log,
    Stages,
    log_stderr,
    prepare_out,
    run_training,
    write_json,
    write_text,
)
from train.experiments.config import TINY_LLAMA, deep_merge, read_yaml
from train.inheritune import HeldOut
from train.metrics import read_metrics

ARMS = ("scratch", "inherit", "distill", "inherit_distill")
MODELS = ("teacher", *ARMS)
DEFAULT: dict[str, Any] = {
    "out": "runs/distill_vs_inherit",
    "train": {
        "batch": 16,
        "mesh": "fsdp=-1",
        "seed": 0,
        "model": {"arch": "llama", "tokenizer": "bundled"},
        "optimizer": {"weight_decay": 0.1, "clip_norm": 1.0},
        "checkpoint": {"every": 0, "keep": 1, "async_save": False},
        "eval": {"every": 25, "batches": 4, "at_end": True},
        "log": {"every": 10, "tensorboard": False, "progress": True, "plot": False},
        # packing: stream, as when docs/experiments/distill.md's results were measured
        "data": {"seq_len": 128, "seed": 0, "eval_fraction": 0.05, "packing": "stream",
                 "sources": {"code": {"kind": "text", "path": "bundled:code", "weight": 0.95},
                             "docs": {"kind": "text", "path": "bundled:docs", "weight": 0.05}}},
        "schedule": {"kind": "cosine", "peak_lr": 3.0e-3, "end_lr": 3.0e-4, "warmup_steps": 20},
    },
    "teacher": {"steps": 400, "config": {**TINY_LLAMA, "num_hidden_layers": 4}},
    "student": {"layers": 2, "steps": 200},
    "distill": {"loss": "forward_kl", "alpha": 0.5, "temperature": 1.0},
}
TOP_KEYS = ("out", "train", "teacher", "student", "distill")


def load_experiment_config(path: str | None = None, overrides: dict | None = None) -> dict:
    """The embedded default deep-merged with the YAML at ``path`` and ``overrides``."""
    raw = read_yaml(path)
    cfg = deep_merge(deep_merge(DEFAULT, raw), overrides or {})
    user_sources = ((raw.get("train") or {}).get("data") or {}).get("sources")
    if user_sources is not None:  # a user's sources replace the default ones
        cfg["train"]["data"]["sources"] = copy.deepcopy(user_sources)
    where = path or "the experiment config"
    for k in cfg:
        if k not in TOP_KEYS:
            raise ConfigError(f"{where}: unknown key {k!r} (valid: {', '.join(TOP_KEYS)})")
    for sec, keys in (("teacher", ("steps", "config")), ("student", ("layers", "steps"))):
        for k in cfg[sec]:
            if k not in keys:
                raise ConfigError(f"{where}: unknown key {sec}.{k} (valid: {', '.join(keys)})")
    t_layers = cfg["teacher"]["config"]["num_hidden_layers"]
    if not 1 <= cfg["student"]["layers"] < t_layers:
        raise ConfigError(f"{where}: student.layers={cfg['student']['layers']} must be in "
                          f"[1, teacher.config.num_hidden_layers={t_layers}): the teacher must "
                          "be the bigger model")
    return cfg


def stage_train_configs(cfg: dict, out: str) -> dict:
    """The training config of the teacher and of each arm (built, so checked, before any work)."""
    models = os.path.join(out, "models")
    teacher_hf = os.path.join(models, "teacher")
    student_cfg = {**cfg["teacher"]["config"], "num_hidden_layers": cfg["student"]["layers"]}
    tok = cfg["train"].get("model", {}).get("tokenizer", "")
    arch = cfg["train"].get("model", {}).get("arch", "llama")
    plans = {
        "teacher": (cfg["teacher"]["steps"], cfg["teacher"]["config"], False, False),
        "scratch": (cfg["student"]["steps"], student_cfg, False, False),
        "inherit": (cfg["student"]["steps"], None, True, False),
        "distill": (cfg["student"]["steps"], student_cfg, False, True),
        "inherit_distill": (cfg["student"]["steps"], None, True, True),
    }
    built = {}
    for name, (steps, model_config, inherit, distill) in plans.items():
        raw = copy.deepcopy(cfg["train"])
        raw["steps"] = steps
        if inherit:
            raw["model"] = {"tokenizer": tok}
            raw["init"] = {"ref": teacher_hf, "layers": f"first:{cfg['student']['layers']}"}
        else:
            raw["model"] = {"arch": arch, "tokenizer": tok, "config": model_config}
        if distill:
            raw["distill"] = {"teacher": teacher_hf, **cfg["distill"]}
        raw["out"] = os.path.join(out, "stages", name)
        raw.setdefault("export", {})["hf_dir"] = os.path.join(models, name)
        try:
            built[name] = from_dict(raw)
        except JaxarithError as e:
            raise type(e)(f"stage {name}: {e}") from None
    return built


def _kl_sums(t_cfg, s_cfg, pt, ps, tokens, mask):
    """(sum, count) of KL(p_teacher || p_student) at temperature 1 over the predicting
    positions of ``tokens`` [B, T] (position t predicts token t + 1; both must be real)."""
    import jax.numpy as jnp

    zt, _, _ = forward(pt, t_cfg, tokens, attention_mask=mask)
    zs, _, _ = forward(ps, s_cfg, tokens, attention_mask=mask)
    kl = per_token(zs[:, :-1], zt[:, :-1], DistillLoss(loss="forward_kl", temperature=1.0))
    valid = (mask[:, :-1] * mask[:, 1:]).astype(jnp.float32)
    return jnp.sum(kl * valid), jnp.sum(valid)


_KL_SUMS: list = []


def heldout_kl(teacher, student, windows, batch: int, mesh=None) -> float:
    """The pooled forward KL(p_teacher || p_student) at temperature 1 over every predicting
    position of ``windows`` [n, T] (the positions the next-token NLL scores), in nats.

    Args:
      teacher, student: loaded models (:func:`jaxarith.io.refs.load_model`) sharing a vocabulary.
      batch: windows per forward (the last batch is padded and masked).
      mesh: the mesh the models' parameters are placed on (None: one device).
    """
    import contextlib

    import jax
    import numpy as np

    if not _KL_SUMS:
        _KL_SUMS.append(jax.jit(_kl_sums, static_argnums=(0, 1)))
    total, count = 0.0, 0.0
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for s in range(0, len(windows), batch):
            chunk = np.asarray(windows[s: s + batch])
            tokens = np.zeros((batch, chunk.shape[1]), np.int32)
            mask = np.zeros_like(tokens)
            tokens[: len(chunk)], mask[: len(chunk)] = chunk, 1
            t, c = _KL_SUMS[0](teacher.config, student.config, teacher.params,
                               student.params, tokens, mask)
            total, count = total + float(t), count + float(c)
    return total / max(count, 1.0)


def evaluate(tcfgs: dict, refs: dict, log: Log) -> dict:
    """Held-out NLL and KL(teacher || model) of every model on the same windows."""
    held = HeldOut(tcfgs["scratch"], refs["teacher"])
    # on the run's mesh: the held-out loss's compiled function expects parameters placed there
    teacher = load_model(refs["teacher"], mesh=held.mesh, progress=False)
    res = {}
    for name in MODELS:
        m = teacher if name == "teacher" else \
            load_model(refs[name], mesh=held.mesh, progress=False)
        res[name] = {"heldout_loss": held(m.params, m.config),
                     "heldout_kl_to_teacher": 0.0 if name == "teacher" else
                     heldout_kl(teacher, m, held.windows, held.batch, held.mesh),
                     "layers": m.config.num_hidden_layers,
                     "params": num_params(m.config)}
        log(f"    {name}: held-out loss {res[name]['heldout_loss']:.4f}, "
            f"KL(teacher || {name}) {res[name]['heldout_kl_to_teacher']:.4f}")
    return {"models": res, "heldout_windows": int(len(held.windows)),
            "heldout_tokens": int(len(held.windows) * (held.windows.shape[1] - 1))}


def curves(tcfgs: dict) -> dict:
    """name -> [(step, held-out loss averaged over the sources)] from each run's eval rows."""
    out = {}
    for name, tc in tcfgs.items():
        pts = []
        for r in read_metrics(os.path.join(tc.out, "metrics.jsonl")):
            losses = [v for k, v in r.items() if k.startswith("eval/") and k.endswith("/loss")]
            if losses:
                pts.append((r["step"], sum(losses) / len(losses)))
        out[name] = pts
    return out


def plot(out: str, results: dict, pts: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in ARMS:
        if pts.get(name):
            m = results["models"][name]
            ax.plot(*zip(*pts[name], strict=True), marker="o", ms=3,
                    label=f"{name}: {m['heldout_loss']:.3f} (KL {m['heldout_kl_to_teacher']:.3f})")
    t = results["models"]["teacher"]
    ax.axhline(t["heldout_loss"], color="gray", ls="--",
               label=f"teacher ({t['layers']} layers, {results['teacher_steps']} steps): "
                     f"{t['heldout_loss']:.3f}")
    ax.set_xlabel("student step")
    ax.set_ylabel("held-out loss (mean over sources, nats)")
    ax.set_title("Inheritune vs distillation (Llama students, CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = os.path.join(out, "loss_curves.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def table(results: dict) -> str:
    """The results as a markdown table (held-out loss, KL to the teacher, vs scratch)."""
    m = results["models"]
    base = m["scratch"]["heldout_loss"]
    lines = ["| model | layers | params | steps | held-out loss | vs scratch | "
             "KL(teacher ‖ model) |", "|---|---|---|---|---|---|---|"]
    for name in MODELS:
        r = m[name]
        steps = results["teacher_steps"] if name == "teacher" else results["student_steps"]
        lines.append(f"| {name} | {r['layers']} | {r['params']:,} | {steps} | "
                     f"{r['heldout_loss']:.4f} | {r['heldout_loss'] - base:+.4f} | "
                     f"{r['heldout_kl_to_teacher']:.4f} |")
    return "\n".join(lines)


def run(cfg: dict, out: str | None = None, *, log: Log = log_stderr,
        progress: bool = True) -> dict:
    """Run (or resume) the experiment; returns the results written to results.json."""
    import dataclasses
    import json

    out = prepare_out(out or cfg["out"], "distill-vs-inherit")
    tcfgs = stage_train_configs(cfg, out)
    if not progress:
        tcfgs = {k: dataclasses.replace(v, log=dataclasses.replace(v.log, progress=False))
                 for k, v in tcfgs.items()}
    refs = {n: tcfgs[n].export.hf_dir for n in MODELS}
    st = Stages(len(MODELS) + 1, log)
    what = {"teacher": "train the teacher", "scratch": "student from scratch",
            "inherit": "student inheriting the teacher's first layers",
            "distill": "student distilled from the teacher",
            "inherit_distill": "student inherited and distilled"}
    for name in MODELS:
        st.run(name, f"{what[name]}, {tcfgs[name].steps} steps", os.path.exists(refs[name]),
               lambda name=name: run_training(name, tcfgs[name]))
    ev_path = os.path.join(out, "eval.json")
    st.run("eval", "held-out loss and KL to the teacher", os.path.exists(ev_path),
           lambda: write_json(ev_path, evaluate(tcfgs, refs, log)))
    with open(ev_path) as f:
        ev = json.load(f)
    results = {**ev, "teacher_steps": tcfgs["teacher"].steps,
               "student_steps": tcfgs["scratch"].steps,
               "tokens_per_student": tcfgs["scratch"].steps * tcfgs["scratch"].batch
               * tcfgs["scratch"].data.seq_len,
               "distill": cfg["distill"], "seed": cfg["train"].get("seed", 0),
               "model_paths": refs, "load_average": list(os.getloadavg()),
               "seconds": st.timings(os.path.join(out, "results.json"))}
    results["seconds_total"] = round(sum(results["seconds"].values()), 1)
    pts = curves(tcfgs)
    results["curves"] = {k: [list(p) for p in v] for k, v in pts.items()}
    write_json(os.path.join(out, "results.json"), results)
    png = plot(out, results, pts)
    write_text(os.path.join(out, "report.md"), f"# Inheritune vs distillation\n\n"
               f"{table(results)}\n\n![curves]({os.path.basename(png)})\n")
    return results
