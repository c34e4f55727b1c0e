"""The Inheritune grow loop: ``python -m train.inheritune CONFIG.yaml [key=value ...] [--json]``.

A train config with an ``inheritune`` section::

    inheritune:
      reference: runs/ref/hf   # the K-layer reference (also every student's init.ref)
      start: 0                 # first student depth n (0: K // 2)
      step: 2                  # n += step after a round that does not match
      tolerance: 0.0           # matched: student held-out loss <= reference's + tolerance

(a) scores the reference on the config's held-out split (the eval windows of every data source,
pooled: a token-weighted mean NLL); (b) for n = start, start + step, ... (at most K) initialises a
student from the reference's first n layers (the ``init:`` section, with ``layers: first:n``; its
other options, e.g. ``parts``, are kept), trains it as a normal run in ``OUT/round_n/`` and scores
its final weights (exported to ``OUT/round_n/hf``) the same way; (c) stops at the first student
whose loss is within tolerance of the reference's, or when the next n would exceed K.

Writes ``OUT/reference.json``, ``OUT/inheritune.jsonl`` (one line per finished round: n, steps,
tokens, val_loss, ref_val_loss, matched, ...) and ``OUT/inheritune.png``. Re-running the command
resumes: finished rounds (those in the jsonl) are not redone, an interrupted round resumes from its
checkpoints. A round stopped by SIGTERM (Ctrl-C) ends the loop with status ``preempted``
(``interrupted``) and exit code ``train.EXIT_PREEMPTED`` = 75 (``EXIT_INTERRUPTED`` = 130): resume
later, not a failure. The same program is ``jaxarith inheritune``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from jaxarith import data as data_lib
from jaxarith.commands import _common
from jaxarith.configfile import load_yaml
from jaxarith.errors import ConfigError
from jaxarith.io import refs
from jaxarith.io.refs import load_model
from jaxarith.models.config import load_config as load_model_config
from jaxarith.sharding import make_mesh
from train import EXIT_INTERRUPTED, EXIT_PREEMPTED, loop  # a round stopped: resume later
from train.config import apply_overrides, build, from_dict
from train.loop import make_eval, tokenizer_for
from train.metrics import read_metrics


@dataclasses.dataclass(frozen=True, kw_only=True)
class InherituneConfig:
    """The ``inheritune:`` section (see the module docstring)."""

    reference: str
    start: int = 0
    step: int = 2
    tolerance: float = 0.0

    def __post_init__(self):
        if not self.reference:
            raise ConfigError("inheritune.reference: give the reference model (a model ref)")
        if self.start < 0 or self.step < 1:
            raise ConfigError(f"inheritune: start={self.start} must be >= 0 and "
                              f"step={self.step} >= 1")
        if self.tolerance < 0:
            raise ConfigError(f"inheritune.tolerance={self.tolerance} must be >= 0")


def load(path: str, overrides: list[str] | None = None) -> tuple[dict, InherituneConfig]:
    """The raw train config (overrides applied, without ``inheritune``) and the grow section."""
    raw = load_yaml(path) or {}
    raw = apply_overrides(raw, list(overrides or []))
    section = raw.pop("inheritune", None)
    if section is None:
        raise ConfigError(f"{path}: no inheritune section (inheritune: {{reference: REF}})")
    grow = build(InherituneConfig, section, "inheritune.")
    init = dict(raw.get("init") or {})
    if init.get("ref") and init["ref"] != grow.reference:
        raise ConfigError(f"init.ref={init['ref']!r} differs from inheritune.reference="
                          f"{grow.reference!r} (the students are initialised from the reference)")
    if init.get("layers"):
        raise ConfigError("init.layers is set by the grow loop (first:n); leave it empty")
    init["ref"] = grow.reference
    raw["init"] = init
    if (raw.get("checkpoint") or {}).get("dir") or (raw.get("export") or {}).get("hf_dir"):
        raise ConfigError("checkpoint.dir and export.hf_dir are per round (OUT/round_n/); "
                          "leave them empty")
    if not raw.get("out"):
        raise ConfigError("out is empty: give an output directory (out=DIR)")
    return raw, grow


def round_config(raw: dict, n: int):
    """The TrainConfig of the round with an ``n``-layer student, in ``OUT/round_n``."""
    raw = json.loads(json.dumps(raw))
    raw["init"]["layers"] = f"first:{n}"
    raw["out"] = os.path.abspath(os.path.join(raw["out"], f"round_{n}"))
    raw.setdefault("export", {})["hf_dir"] = os.path.join(raw["out"], "hf")
    return from_dict(raw)


class HeldOut:
    """The pooled held-out loss of a config's data, for any params (reference or student)."""

    def __init__(self, cfg, model_dir: str | None):
        self.mesh = make_mesh(cfg.mesh)
        self.cfg = cfg
        self.batch = cfg.batch // cfg.microbatches
        sources = data_lib.load_sources(cfg.data, tokenizer_for(cfg, model_dir))
        n_eval = cfg.eval.batches * self.batch
        sets = [data_lib.eval_windows(s, n_eval) for s in sources if len(s.eval)]
        if not sets:
            raise ConfigError("data: no held-out windows (set data.eval_fraction > 0)")
        self.windows = np.concatenate(sets) if not isinstance(sets[0], dict) else \
            {k: np.concatenate([x[k] for x in sets]) for k in sets[0]}
        self.n_windows = sum(len(x["tokens"] if isinstance(x, dict) else x) for x in sets)

    def __call__(self, params, model_cfg) -> float:
        evaluate = make_eval(model_cfg, self.mesh, self.batch, self.cfg.data.seq_len,
                             self.cfg.model.compute_dtype)
        return float(evaluate(params, self.windows))


def _read_rounds(path: str) -> dict[int, dict]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["n"]: r for r in (json.loads(line) for line in f if line.strip())}


def _append(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def run(path: str, overrides: list[str] | None = None, *, on_round=None) -> dict:
    """Run (or resume) the grow loop of config ``path``; see the module docstring.

    Args:
      on_round: called with each newly finished round's record (tests, custom hooks).
    Returns:
      ``{"status": "matched" | "unmatched" | "preempted" | "interrupted", "rounds": [...],
      "ref_val_loss",
      "reference_layers", "out", "jsonl", "plot"}``.
    """
    raw, grow = load(path, overrides)
    out = os.path.abspath(raw["out"])
    ref_dir = refs.resolve(grow.reference).dir
    K = load_model_config(ref_dir).num_hidden_layers
    start = grow.start or K // 2
    if not 1 <= start <= K:
        raise ConfigError(f"inheritune.start={start}: must be between 1 and the reference's "
                          f"{K} layers")
    plan = list(range(start, K + 1, grow.step))
    first = round_config(raw, plan[0])  # validates the whole config before any work
    os.makedirs(out, exist_ok=True)
    jsonl = os.path.join(out, "inheritune.jsonl")
    ref_json = os.path.join(out, "reference.json")
    held = None

    ref_rec = None
    if os.path.exists(ref_json):
        with open(ref_json) as f:
            ref_rec = json.load(f)
    if ref_rec is None or ref_rec.get("reference") != grow.reference:
        held = HeldOut(first, ref_dir)
        ref = load_model(grow.reference, mesh=held.mesh, progress=False)
        ref_rec = {"reference": grow.reference, "layers": K,
                   "ref_val_loss": held(ref.params, ref.config), "windows": held.n_windows}
        del ref
        _write_json(ref_json, ref_rec)
    ref_loss = ref_rec["ref_val_loss"]

    done = _read_rounds(jsonl)
    status = "unmatched"
    rounds = []
    for n in plan:
        rec = done.get(n)
        if rec is None:
            cfg = round_config(raw, n)
            summary = loop.run(cfg)
            if summary["status"] != "done":  # preempted (SIGTERM) / interrupted (Ctrl-C)
                status = summary["status"]
                break
            held = held or HeldOut(cfg, ref_dir)
            student = load_model(cfg.export.hf_dir, mesh=held.mesh, progress=False)
            val = held(student.params, student.config)
            del student
            rec = {"n": n, "steps": cfg.steps,
                   "tokens": cfg.steps * cfg.batch * cfg.data.seq_len,
                   "val_loss": val, "ref_val_loss": ref_loss,
                   "matched": bool(val <= ref_loss + grow.tolerance),
                   "layers": list(range(n)), "out": cfg.out, "hf": cfg.export.hf_dir,
                   "train_loss": summary.get("loss")}
            _append(jsonl, rec)
            plot(out)
            if on_round is not None:
                on_round(rec)
        rounds.append(rec)
        if rec["matched"]:
            status = "matched"
            break
    png = plot(out)
    return {"status": status, "rounds": rounds, "ref_val_loss": ref_loss, "reference_layers": K,
            "planned": plan, "out": out, "jsonl": jsonl, "plot": png}


def plot(out: str) -> str | None:
    """``OUT/inheritune.png``: each round's train/eval curves against the reference's loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = _read_rounds(os.path.join(out, "inheritune.jsonl"))
    if not rounds:
        return None
    ref = next(iter(rounds.values()))["ref_val_loss"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for n, rec in sorted(rounds.items()):
        mpath = os.path.join(rec["out"], "metrics.jsonl")
        recs = read_metrics(mpath) if os.path.exists(mpath) else []
        pts = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        line = ax.plot(*zip(*pts, strict=True), lw=1, label=f"n={n} train")[0] if pts else None
        ax.plot([rec["steps"]], [rec["val_loss"]], "o",
                color=None if line is None else line.get_color(),
                label=f"n={n} held-out {rec['val_loss']:.3f}")
    ax.axhline(ref, color="k", ls="--", lw=1, label=f"reference held-out {ref:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("Inheritune rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = os.path.join(out, "inheritune.png")
    fig.savefig(png + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(png + ".tmp.png", png)
    return png


# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="train YAML config with an inheritune section")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. out=DIR steps=200 inheritune.start=6")
    p.add_argument("--json", action="store_true",
                   help="print one JSON summary object on stdout (no progress bars)")


def handle(args) -> int:
    overrides = list(args.overrides)
    if args.json:
        overrides.append("log.progress=false")
    res = run(args.config, overrides)
    if args.json:
        print(json.dumps(res, default=str))
    else:
        for r in res["rounds"]:
            print(f"n={r['n']}: held-out {r['val_loss']:.4f} vs reference "
                  f"{r['ref_val_loss']:.4f} ({'matched' if r['matched'] else 'above'})")
        print(f"{res['status']}; outputs in {res['out']}")
    if res["status"] == "preempted":
        return EXIT_PREEMPTED
    return EXIT_INTERRUPTED if res["status"] == "interrupted" else 0


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(prog="python -m train.inheritune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    args.command = "inheritune"
    args.handler = handle

    return _common.run(args)


if __name__ == "__main__":
    sys.exit(main())
