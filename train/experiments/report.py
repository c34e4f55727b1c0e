"""results.json, report.md and the PNGs of the delta-transplant experiment.

Everything here reads the stages' outputs (per-model eval JSON, norms JSON, the training
programs' ``metrics.jsonl``) and writes files; nothing is recomputed.
"""

from __future__ import annotations

import json
import os

MODELS = ("base", "instruct", "trained", "final", "instruct_trained")
METRICS = ("new_domain_loss", "old_domain_loss", "instruct_loss", "instruct_exact_match")
NORM_KEYS = ("base_norm", "other_norm", "diff_norm", "base_over_other", "diff_over_other",
             "diff_over_base")
DESCRIBE = {
    "base": "(a) pre-trained on the old domain",
    "instruct": "(b) base + instruction tuning",
    "trained": "(d) base continued on the new domain",
    "final": "(e) trained + (instruct - base)",
    "instruct_trained": "(f) instruct continued on the new domain",
}


def results(evals: dict, delta: dict, moved: dict, refs: dict) -> dict:
    """The results.json object (see ``docs/experiments/delta_transplant.md`` for the keys).

    ``trained_minus_base_over_delta`` is ``diff_norm(trained - base) / diff_norm(instruct -
    base)`` under the ``abs`` measure (mean absolute entry); ``..._by_measure`` gives both.
    """
    ratio = {m: moved[m]["diff_norm"] / delta[m]["diff_norm"] if delta[m]["diff_norm"] else
             float("inf") for m in delta}
    return {
        "models": {name: {k: evals[name][k] for k in METRICS} for name in MODELS},
        "norms": {m: {k: delta[m][k] for k in NORM_KEYS} for m in delta},
        "trained_minus_base_norms": {m: {k: moved[m][k] for k in NORM_KEYS} for m in moved},
        "trained_minus_base_over_delta": ratio["abs"],
        "trained_minus_base_over_delta_by_measure": ratio,
        "model_paths": dict(refs),
        "sample_answers": {name: evals[name].get("sample_answers", []) for name in MODELS},
    }


def table(res: dict) -> str:
    """The result table as Markdown (also what the command prints)."""
    head = ("| model | new-domain loss | old-domain loss | instruct answer NLL | "
            "instruct exact match |")
    lines = [head, "|---|---:|---:|---:|---:|"]
    for name in MODELS:
        m = res["models"][name]
        lines.append(f"| {name} | {m['new_domain_loss']:.4f} | {m['old_domain_loss']:.4f} | "
                     f"{m['instruct_loss']:.4f} | {100 * m['instruct_exact_match']:.1f}% |")
    r = res["trained_minus_base_over_delta_by_measure"]
    lines.append("")
    lines.append(f"||trained - base|| / ||instruct - base||: {r['abs']:.3f} (abs measure), "
                 f"{r['square']:.3f} (square measure)")
    return "\n".join(lines)


def _norms_table(title: str, rep: dict) -> list[str]:
    lines = [f"**{title}**", "", "| measure | " + " | ".join(NORM_KEYS) + " |",
             "|---|" + "---:|" * len(NORM_KEYS)]
    for m, r in rep.items():
        lines.append(f"| {m} | " + " | ".join(f"{r[k]:.4g}" for k in NORM_KEYS) + " |")
    return lines + [""]


def write_report(out: str, res: dict, delta: dict, moved: dict, tcfgs: dict) -> str:
    lines = ["# Delta transplant: results", "",
             "Models: " + "; ".join(f"`{n}` {DESCRIBE[n]}" for n in MODELS) + ".", "",
             "Domain losses: mean NLL per token of `eval/new_domain.txt` / `eval/old_domain.txt`"
             " (held-out documents; `jaxarith eval-loss models/NAME --text eval/new_domain.txt`"
             " reproduces them). Instruction eval: answer-only NLL and exact match of greedy "
             "answers on held-out conversations.", "", table(res), "",
             "![loss curves](loss_curves.png)", "", "![evals](evals.png)", "",
             "## Norms (the seed's measure: mean |w| (abs) or mean w^2 (square))", ""]
    lines += _norms_table("delta = instruct - base (base_norm: base, other_norm: instruct)",
                          delta)
    lines += _norms_table("trained - base (other_norm: trained)", moved)
    lines += ["![per-layer norms](norms_per_layer.png)", "", "## Stages", "",
              "| stage | steps | seconds |", "|---|---:|---:|"]
    for name, sec in res.get("seconds", {}).items():
        steps = tcfgs[name].steps if name in tcfgs else ""
        lines.append(f"| {name} | {steps} | {sec} |")
    lines += ["", "## Sample greedy answers", ""]
    for name in ("instruct", "final", "instruct_trained"):
        for s in res["sample_answers"][name][:3]:
            lines.append(f"- `{name}` Q: {s['question']} | reference: {s['reference']!r} | "
                         f"answer: {s['answer']!r}")
    path = os.path.join(out, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    _plt().close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def plot_loss_curves(out: str, tcfgs: dict, order=MODELS) -> str:
    """Training loss of every stage against its step (one panel per stage)."""
    plt = _plt()
    names = [n for n in order if n in tcfgs]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        path = os.path.join(tcfgs[name].out, "metrics.jsonl")
        recs = []
        if os.path.exists(path):
            with open(path) as f:
                recs = [json.loads(line) for line in f if line.strip()]
        pts = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), lw=1, label="train")
        for k in sorted({k for r in recs for k in r if k.startswith("eval/")}):
            ev = [(r["step"], r[k]) for r in recs if k in r]
            ax.plot(*zip(*ev, strict=True), "o", ms=4, label=k)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss (nats / token)")
    return _save(fig, os.path.join(out, "loss_curves.png"))


def plot_evals(out: str, res: dict) -> str:
    """Grouped bars: each metric (panel) for every model (bar)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    colors = ["#888888", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    for ax, metric in zip(axes, METRICS, strict=True):
        vals = [res["models"][n][metric] for n in MODELS]
        ax.bar(range(len(MODELS)), vals, color=colors)
        ax.set_xticks(range(len(MODELS)), MODELS, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
        lo = min(vals)
        if metric.endswith("loss"):
            ax.set_ylim(lo * 0.9, max(vals) * 1.02)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, os.path.join(out, "evals.png"))


def plot_norms(out: str, delta: dict, moved: dict) -> str:
    """Per-layer diff norms (abs measure): instruct - base against trained - base."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for rep, label in ((delta, "instruct - base (delta)"), (moved, "trained - base")):
        rows = rep["abs"]["per_layer"]
        xs = [r["layer"] if r["layer"] is not None else -1 for r in rows]
        ax.plot(xs, [r["diff_norm"] for r in rows], "o-", label=label)
    ax.set_xlabel("layer (-1: embeddings, final norm, lm_head)")
    ax.set_ylabel("mean |diff|")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, os.path.join(out, "norms_per_layer.png"))


def write_all(out: str, res: dict, delta: dict, moved: dict, tcfgs: dict) -> dict:
    """report.md and the three PNGs; returns their paths."""
    return {"report": write_report(out, res, delta, moved, tcfgs),
            "loss_curves": plot_loss_curves(out, tcfgs),
            "evals": plot_evals(out, res),
            "norms_per_layer": plot_norms(out, delta, moved)}
