"""results.json tables, report.md and PNGs of the weak-to-strong experiment (reads, never
recomputes)."""

from __future__ import annotations

import os

from train.experiments.report import _plt, _save, plot_loss_curves

STAGES = ("small_base", "large_base", "small_tuned", "large_tuned")


def table(res: dict) -> str:
    lines = ["| model / combination | answer NLL | exact match | gap closed (NLL) | "
             "gap closed (exact match) |", "|---|---:|---:|---:|---:|"]
    fmt = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
    for name, m in res["models"].items():
        g = res["gap_closed"].get(name, {})
        lines.append(f"| {name} | {m['instruct_loss']:.4f} | "
                     f"{100 * m['instruct_exact_match']:.1f}% | "
                     f"{fmt(g.get('instruct_loss')) if g else ''} | "
                     f"{fmt(g.get('instruct_exact_match')) if g else ''} |")
    sp = res["speculative"]
    lines += ["", "| decoding | tokens/s | acceptance | speed-up over plain EFT | "
              "same answers |", "|---|---:|---:|---:|---|"]
    for name, t in sp.items():
        if not isinstance(t, dict):
            continue
        acc, up = t.get("acceptance_rate"), t.get("speedup_over_plain_eft")
        lines.append(f"| {name} | {t['tokens_per_s']:.1f} | "
                     f"{'' if acc is None else f'{acc:.2f}'} | "
                     f"{'' if up is None else f'{up:.2f}x'} | "
                     f"{t.get('same_answers_as_plain_eft', '')} |")
    return "\n".join(lines)


def write_all(out: str, res: dict, tcfgs: dict) -> dict:
    plt = _plt()
    names = list(res["models"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, metric in zip(axes, ("instruct_loss", "instruct_exact_match"), strict=True):
        ax.bar(range(len(names)), [res["models"][n][metric] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    evals_png = _save(fig, os.path.join(out, "instruct_eval.png"))
    sp = {k: v for k, v in res["speculative"].items() if isinstance(v, dict)}
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.bar(range(len(sp)), [v["tokens_per_s"] for v in sp.values()])
    ax.set_xticks(range(len(sp)), list(sp), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("tokens / s (greedy)")
    ax.grid(axis="y", alpha=0.3)
    speed_png = _save(fig, os.path.join(out, "speed.png"))
    curves = plot_loss_curves(out, tcfgs, STAGES)
    lines = ["# Weak-to-strong: results", "",
             "Proxy tuning / EFT up-scaling: `large_base + alpha (small_tuned - small_base)` "
             "(log-probabilities, renormalised). Gap closed: `(combined - large base) / "
             "(large tuned - large base)`.", "", table(res), "",
             "![instruction eval](instruct_eval.png)", "", "![speed](speed.png)", "",
             "![loss curves](loss_curves.png)", ""]
    path = os.path.join(out, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return {"report": path, "instruct_eval": evals_png, "speed": speed_png,
            "loss_curves": curves}
