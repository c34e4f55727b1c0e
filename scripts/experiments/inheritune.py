"""A small reproduction of Inheritune's GPT-2 claim on the bundled corpora (CPU).

Trains, with one recipe (the bundled code corpus + 5% docs replay, WSD schedule, seed fixed):

  reference   GPT-2 of K layers from scratch, T steps
  inheritune  first K/2 layers (+ embeddings, head, final norm, wpe) of the reference, T steps
  attn_only   the same student inheriting only attention (MLPs and norms fresh), T steps
  mlp_only    the same student inheriting only MLPs (attention and norms fresh), T steps
  embed_only  the same student inheriting no block at all (embeddings, head, norms, wpe), T steps
  scratch_T   K/2 layers from scratch, T steps;  scratch_2T: 2T steps

and scores every final model on the held-out windows of both sources (pooled token-mean NLL,
``train.inheritune.HeldOut``). Writes OUT/results.json, OUT/results.md and OUT/curves.png.
Each run is a normal training run in OUT/<name>/ (re-running the script resumes / skips them).

    python scripts/experiments/inheritune.py --quick --out runs/inheritune_quick   # ~15 min
    python scripts/experiments/inheritune.py --out runs/inheritune                 # larger
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import yaml

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
BASE = os.path.join(ROOT, "configs", "tiny_gpt2.yaml")

PRESETS = {  # layers K, width, heads, steps T, batch, seq_len, eval windows per source (batches)
    "quick": dict(K=8, n_embd=64, n_head=4, T=120, batch=16, seq_len=128, eval_batches=4),
    "full": dict(K=12, n_embd=128, n_head=4, T=600, batch=16, seq_len=128, eval_batches=8),
}


def base_raw(p: dict, out: str, steps: int, seed: int) -> dict:
    with open(BASE) as f:
        raw = yaml.safe_load(f)
    raw.update(out=out, steps=steps, batch=p["batch"], seed=seed)
    raw["model"]["config"].update(n_embd=p["n_embd"], n_head=p["n_head"], n_layer=p["K"])
    raw["data"]["seq_len"] = p["seq_len"]
    raw["schedule"].update(warmup_steps=max(1, steps // 10), cooldown_steps=max(1, steps // 5),
                           peak_lr=3e-3, end_lr=3e-4)
    raw["average"] = {"kind": "none"}
    raw["eval"] = {"every": max(1, p["T"] // 6), "batches": p["eval_batches"]}
    raw["checkpoint"] = {"every": 0, "keep": 1}
    raw["log"] = {"every": 10, "tensorboard": False, "progress": False, "plot": False}
    raw["export"] = {"hf_dir": os.path.join(out, "hf")}  # every run's final weights
    return raw


def runs(p: dict, out: str, seed: int) -> dict[str, dict]:
    """name -> raw train config, in the order they must run."""
    K, T, half = p["K"], p["T"], p["K"] // 2
    ref_hf = os.path.join(out, "reference", "hf")
    ref = base_raw(p, os.path.join(out, "reference"), T, seed)

    def student(name, steps, **init):
        raw = base_raw(p, os.path.join(out, name), steps, seed)
        if init:
            raw["model"] = {}
            raw["init"] = {"ref": ref_hf, "layers": f"first:{half}", **init}
        else:
            raw["model"]["config"]["n_layer"] = half
        return raw

    del K
    return {
        "reference": ref,
        "inheritune": student("inheritune", T, parts=["attn", "mlp", "norms"]),
        "attn_only": student("attn_only", T, parts=["attn"]),
        "mlp_only": student("mlp_only", T, parts=["mlp"]),
        "embed_only": student("embed_only", T, parts=[]),
        "scratch_T": student("scratch_T", T),
        "scratch_2T": student("scratch_2T", 2 * T),
    }


def plot(out: str, names: list[str], results: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.metrics import read_metrics

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in names:
        recs = read_metrics(os.path.join(out, name, "metrics.jsonl"))
        pts = [(r["step"], (r["eval/code/loss"] * 0.5 + r["eval/replay/loss"] * 0.5))
               for r in recs if "eval/code/loss" in r]
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=f"{name} "
                f"({results[name]['layers']} layers): {results[name]['val_loss']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (mean of code, docs)")
    ax.set_title("Inheritune on the bundled corpora (GPT-2, CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = os.path.join(out, "curves.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small preset (~15 min on 2 cores)")
    ap.add_argument("--out", default="runs/inheritune")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    args = ap.parse_args(argv)

    from jaxarith.io.refs import load_model
    from jaxarith.models.config import load_config as load_model_config
    from train import EXIT_INTERRUPTED, EXIT_PREEMPTED, loop
    from train.config import from_dict
    from train.inheritune import HeldOut

    p = PRESETS["quick" if args.quick else "full"]
    out = os.path.abspath(args.out)
    plan = runs(p, out, args.seed)
    names = [n for n in plan if not args.only or n in args.only.split(",")]
    results: dict = {}
    previous = {}
    if os.path.exists(os.path.join(out, "results.json")):
        with open(os.path.join(out, "results.json")) as f:
            previous = json.load(f)["results"]
    held = None
    t_all = time.perf_counter()
    for name in names:
        cfg = from_dict(plan[name])
        t0 = time.perf_counter()
        summary = loop.run(cfg)
        if summary["status"] != "done":
            print(f"{name}: {summary['status']}; re-run to resume")
            return EXIT_PREEMPTED if summary["status"] == "preempted" else EXIT_INTERRUPTED
        secs = time.perf_counter() - t0
        m = load_model(cfg.export.hf_dir, progress=False)  # the run's final weights
        model_cfg, params = m.config, m.params
        if held is None:
            held = HeldOut(cfg, os.path.join(out, "reference", "hf"))
        results[name] = {
            "layers": model_cfg.num_hidden_layers, "steps": cfg.steps,
            "tokens": cfg.steps * cfg.batch * cfg.data.seq_len,
            "val_loss": held(params, model_cfg),
            "seconds": previous.get(name, {}).get("seconds") if summary.get("already_done")
            else round(secs, 1),
            "final_eval": summary.get("eval"),
        }
        print(json.dumps({name: results[name]}), flush=True)
    meta = {"preset": "quick" if args.quick else "full", **p, "seed": args.seed,
            "data": "bundled:code 0.95 + bundled:docs 0.05", "heldout_windows": len(held.windows),
            "total_seconds": round(time.perf_counter() - t_all, 1),
            "load_average": os.getloadavg(), "machine": platform.processor() or platform.machine(),
            "reference_config": load_model_config(os.path.join(out, "reference", "hf")).to_hf()
            if os.path.exists(os.path.join(out, "reference", "hf")) else None}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2, default=str)
    lines = ["| run | layers | steps | tokens | held-out loss |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {r['layers']} | {r['steps']} | {r['tokens']:,} | {r['val_loss']:.4f} |"
              for n, r in results.items()]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if all(n in results for n in names):
        print("plot:", plot(out, names, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
