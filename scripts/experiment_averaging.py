"""Experiment: does weight averaging help early in training at a high learning rate?

Trains the tiny Llama config (``configs/tiny_llama.yaml``) four times with the same seed, data
order and learning-rate schedule, each run keeping one averager in its train state (EMA, SWA,
LaWA k=5, and none), and compares the held-out loss of the last weights (``eval/<source>/loss``,
identical in every run: averaging does not change the trajectory) with that of each average
(``eval_avg/<source>/loss``). Writes ``OUT/report.md`` (table) and ``OUT/averaging.png``.

    python scripts/experiment_averaging.py --out /tmp/exp_averaging           # ~10 min here
    python scripts/experiment_averaging.py --out /tmp/exp_avg_quick --quick    # ~3 min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIG = os.path.join(ROOT, "configs", "tiny_llama.yaml")
AVERAGERS = {
    "none": [],
    "ema": ["average.kind=ema", "average.decay=0.95"],
    "swa": ["average.kind=swa", "average.start={half}", "average.every=5"],
    "lawa": ["average.kind=lawa", "average.k=5", "average.every={lawa_every}"],
}


def common(steps: int, quick: bool) -> list[str]:
    """The shared run: a high peak LR (1e-2, ~3x the tiny config's), cosine to 1e-3."""
    return [f"steps={steps}", "batch=8", "data.seq_len=128", "schedule.kind=cosine",
            "schedule.peak_lr=1e-2", "schedule.end_lr=1e-3", "schedule.warmup_steps=10",
            f"eval.every={10 if quick else 20}", "eval.batches=4", "log.every=10",
            "log.progress=false", "log.tensorboard=false", "checkpoint.every=0",
            "checkpoint.keep=1", "seed=0", "data.seed=0",
            *(["data.sources.code.max_docs=800", "data.sources.replay.max_docs=300"]
              if quick else [])]


def run(name: str, out: str, steps: int, quick: bool) -> float:
    extra = [a.format(half=steps // 2, lawa_every=max(steps // 40, 1)) for a in AVERAGERS[name]]
    cmd = [sys.executable, "-m", "train", CONFIG, f"out={os.path.join(out, name)}",
           *common(steps, quick), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def curves(out: str, name: str, source: str) -> dict[str, dict[int, float]]:
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    res: dict[str, dict[int, float]] = {"last": {}, "avg": {}}
    for r in recs:
        if f"eval/{source}/loss" in r:
            res["last"][r["step"]] = r[f"eval/{source}/loss"]
        if f"eval_avg/{source}/loss" in r:
            res["avg"][r["step"]] = r[f"eval_avg/{source}/loss"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="100 steps, fewer documents")
    ap.add_argument("--source", default="code", help="held-out source to report")
    args = ap.parse_args(argv)
    steps = args.steps or (100 if args.quick else 300)
    os.makedirs(args.out, exist_ok=True)
    seconds = {}
    for name in AVERAGERS:
        if not os.path.exists(os.path.join(args.out, name, "summary.json")):
            seconds[name] = round(run(name, args.out, steps, args.quick), 1)
    data = {name: curves(args.out, name, args.source) for name in AVERAGERS}
    last = data["none"]["last"]
    same = all(abs(data[n]["last"].get(s, float("nan")) - v) < 1e-4
               for n in AVERAGERS for s, v in last.items())
    rows = {"last": last, **{n: data[n]["avg"] for n in AVERAGERS if n != "none"}}
    steps_ = sorted(last)
    lines = [f"held-out `{args.source}` loss (nats/token), tiny Llama, {steps} steps, peak LR "
             "1e-2 (cosine to 1e-3), seed 0; last weights identical in all runs: "
             f"{'yes' if same else 'NO'}", "",
             "| step | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for s in steps_:
        lines.append(f"| {s} | " + " | ".join(f"{rows[k].get(s, float('nan')):.4f}"
                                               for k in rows) + " |")
    if seconds:
        lines += ["", "run seconds: " + ", ".join(f"{k} {v}" for k, v in seconds.items()),
                  f"load average: {os.getloadavg()[0]:.1f}"]
    report = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k, c in rows.items():
        pts = sorted(c.items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                label=f"{k} weights" if k == "last" else k.upper() if k != "lawa" else "LaWA k=5")
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out {args.source} loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "averaging.png"), dpi=100)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
