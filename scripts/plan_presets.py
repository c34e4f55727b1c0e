"""Presets planned on their slices: compile each model's train step for each TPU slice (the code
path of ``jaxarith plan --json``, :func:`train.plan.plan_train`: libtpu's abstract topologies,
no TPU needed) and print a markdown table of per-chip HBM, whether it fits, and the smallest
slice that fits; every plan is written as JSON.

The run: bf16 compute, full remat, splash attention, AdamW, no averaging, pure FSDP over the
slice (``mesh=fsdp=-1``), ``tokens_per_chip`` tokens per chip and step (8192 by default: 4 x 2048
or 1 x 8192; the global batch grows with the slice). A state that cannot fit (the parameters and
AdamW's moments alone, 12 bytes a parameter) is refused before compiling; a program the compiler
refuses is recorded with its one-line reason.

    python scripts/plan_presets.py --json bench_results/plan_presets.json     # the whole table
    python scripts/plan_presets.py --models meta-llama/Llama-3.1-8B --slices v5p-8 --seqs 2048
    python scripts/plan_presets.py --tiny --json /tmp/plan_presets_tiny.json  # tests: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from train import plan as plan_lib  # noqa: E402
from train.config import load_train_config  # noqa: E402

BASE = os.path.join(ROOT, "configs", "tiny_llama.yaml")
MODELS = ["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B",
          "mistralai/Mixtral-8x7B-v0.1"]
SLICES = ["v5e-16", "v5e-64", "v5e-256", "v5p-8", "v5p-64", "v5p-128", "v6e-8", "v6e-64"]
SEQS = [2048, 8192]
RUN = ["average.kind=none", "model.compute_dtype=bfloat16", "model.remat=full",
       "model.attention=splash", "mesh=fsdp=-1", "model.arch=", "model.config={}",
       "out=unused-plan"]
# --tiny: tiny_llama's own 2-layer model (its config, not a preset), float32
TINY_RUN = ["average.kind=none", "mesh=fsdp=-1", "out=unused-plan"]


def plan_one(model: str | None, slice_name: str, seq: int, tokens_per_chip: int,
             extra: list[str]) -> dict:
    sl = plan_lib.parse_slice(slice_name)
    batch = max(1, tokens_per_chip // seq) * sl.total_chips
    over = ([*RUN, f"model.ref={model}"] if model else list(TINY_RUN)) + \
        [f"batch={batch}", f"data.seq_len={seq}", *extra]
    cfg = load_train_config(BASE, over)
    row = {"model": model or "tiny_llama", "slice": slice_name, "seq_len": seq, "batch": batch,
           "chips": sl.total_chips, "hbm_bytes": sl.hbm_bytes}
    try:
        res = plan_lib.plan_train(cfg, sl)
    except plan_lib.DoesNotFitError as e:
        return {**row, "fits": False, "error": str(e)}
    return {**row, "fits": res["fits"], "per_chip_bytes": res["per_chip_bytes"],
            "compile_seconds": res["compile_seconds"], "jax": res["jax"],
            "libtpu": res["libtpu"]}


def smallest(rows: list[dict]) -> dict[tuple[str, int], str]:
    """(model, seq) -> the slice with the fewest chips that fits (ties: the first listed)."""
    out: dict[tuple[str, int], str] = {}
    for r in sorted((r for r in rows if r["fits"]), key=lambda r: r["chips"]):
        out.setdefault((r["model"], r["seq_len"]), r["slice"])
    return out


def table(rows: list[dict]) -> str:
    best = smallest(rows)
    lines = ["| model | seq | slice | chips | batch | per chip | of HBM | fits | compile |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " (smallest)" if best.get((r["model"], r["seq_len"])) == r["slice"] else ""
        if "per_chip_bytes" in r:
            total = r["per_chip_bytes"]["total"]
            cells = (f"{total / 1e9:.2f} GB | {100 * total / r['hbm_bytes']:.0f}% | "
                     f"{'yes' if r['fits'] else 'no'}{mark} | {r['compile_seconds']:.0f} s")
        else:
            reason = "the state alone" if "state alone" in r["error"] else "compiler refused"
            cells = f"- | - | no ({reason}) | -"
        lines.append(f"| {r['model'].split('/')[-1]} | {r['seq_len']} | {r['slice']} | "
                     f"{r['chips']} | {r['batch']} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of presets")
    p.add_argument("--slices", default=",".join(SLICES), help="comma list of TPU slices")
    p.add_argument("--seqs", default=",".join(map(str, SEQS)), help="comma list of lengths")
    p.add_argument("--tokens-per-chip", type=int, default=8192)
    p.add_argument("--tiny", action="store_true",
                   help="tiny_llama's 2-layer model instead of the presets (tests)")
    p.add_argument("--json", metavar="PATH", help="write every plan here as JSON")
    args = p.parse_args(argv)
    models = [None] if args.tiny else args.models.split(",")
    seqs = [int(s) for s in args.seqs.split(",")]
    rows = []
    for model in models:
        for seq in seqs:
            for s in args.slices.split(","):
                r = plan_one(model, s, seq, args.tokens_per_chip, args.overrides)
                rows.append(r)
                print(f"{r['model']} {seq} {s}: "
                      + (f"{r['per_chip_bytes']['total'] / 1e9:.2f} GB" if "per_chip_bytes" in r
                         else r["error"]), file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "smallest": {f"{m} {s}": v for (m, s), v in
                                                  smallest(rows).items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
