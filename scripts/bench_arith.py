"""Benchmark the streamed delta/merge executor against a file copy and mergekit.

Generates bfloat16 Llama-shaped checkpoints (sharded safetensors, random weights) of ~0.5B and
~1B parameters, then times, each in a fresh process: ``delta extract``, ``delta apply`` and a
3-model TIES merge (base + 2), a plain copy of the same input bytes, and mergekit's
task_arithmetic and ties (mergekit 0.1.5 is in the project's ``test`` extra, so by default the
``mergekit-yaml`` beside this Python is used; ``--mergekit PYTHON`` picks another venv's,
``--mergekit none`` skips it). Reports wall time, peak RSS and effective bandwidth (bytes read +
written per second), its fraction of this run's measured copy bandwidth (``scripts/benchenv.py``),
and ratios to mergekit.

    .venv/bin/python scripts/bench_arith.py --quick            # tiny sizes, < 1 min
    .venv/bin/python scripts/bench_arith.py                    # 0.5B and 1B, with mergekit
    .venv/bin/python scripts/bench_arith.py --methods new --methods-only --sizes 0.5B
                                                    # mergekit's other methods, side by side
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import benchenv  # scripts/ is on sys.path when this file runs
import ml_dtypes
import numpy as np

from jaxarith.io.convert.keymap import expand, rules_for
from jaxarith.io.convert.safetensors_io import write_safetensors
from jaxarith.models.config import load_config

SIZES = {  # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "tiny": (64, 128, 2, 4, 2, 1024),
    "0.5B": (2048, 5632, 8, 32, 4, 32000),
    "1B": (2048, 5632, 22, 32, 4, 32000),
}
WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def make_checkpoint(d: str, size: str, seed: int, shard_bytes: int = 1 << 30) -> int:
    import transformers

    h, f, n_layers, heads, kv, vocab = SIZES[size]
    transformers.LlamaConfig(hidden_size=h, intermediate_size=f, num_hidden_layers=n_layers,
                             num_attention_heads=heads, num_key_value_heads=kv,
                             vocab_size=vocab, tie_word_embeddings=False,
                             torch_dtype="bfloat16",
                             architectures=["LlamaForCausalLM"]).save_pretrained(d)
    cfg = load_config(d)
    rng = np.random.default_rng(seed)
    specs = [(k, r.hf_shape) for r in rules_for(cfg) for k, _ in expand(r, n_layers)]
    shards, cur, size_ = [[]], 0, 0
    for k, s in specs:
        nb = int(np.prod(s)) * 2
        if shards[-1] and size_ + nb > shard_bytes:
            shards.append([])
            size_ = 0
        shards[-1].append((k, s))
        size_ += nb
        cur += nb
    wmap = {}
    for i, part in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        gen = ((rng.standard_normal(s, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
               for _, s in part)
        write_safetensors(os.path.join(d, name), [(k, s, ml_dtypes.bfloat16) for k, s in part],
                          gen)
        wmap.update({k: name for k, _ in part})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": cur}, "weight_map": wmap}, fh)
    return cur


def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
               if f.endswith(".safetensors"))


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS GiB) of a command run in a fresh process."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{cmd} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0, int(r.stdout.strip().splitlines()[-1]) / 2**20


# method: (has a base model, models besides the base, shared parameters, per-model parameters)
METHODS = {
    "task_arithmetic": (True, 2, "", "weight: 1.0"),
    "ties": (True, 2, "", "weight: 1.0, density: 0.5"),
    "breadcrumbs": (True, 2, "", "weight: 1.0, density: 0.9, gamma: 0.01"),
    "breadcrumbs_ties": (True, 2, "", "weight: 1.0, density: 0.9, gamma: 0.01"),
    "della": (True, 2, "", "weight: 1.0, density: 0.5, epsilon: 0.1"),
    "della_linear": (True, 2, "", "weight: 1.0, density: 0.5, epsilon: 0.1"),
    "sce": (True, 2, "", ""),
    "model_stock": (True, 2, "", ""),
    "nearswap": (True, 1, "t: 0.001", ""),
    "arcee_fusion": (True, 1, "", ""),
    "nuslerp": (False, 2, "", "weight: 0.5"),
    "multislerp": (False, 2, "", "weight: 0.5"),
    "karcher": (False, 2, "", ""),
}
# mergekit 0.1.5's methods jaxarith added in wave 3 (issue 26): `--methods new`
NEW_METHODS = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "model_stock",
               "nearswap", "arcee_fusion", "nuslerp", "multislerp", "karcher")


def mergekit_yaml(method: str, base: str, models: list[str]) -> str:
    has_base, n, shared, per = METHODS[method]
    inputs = models[:n] if has_base else [base, *models][:n]
    lines = [f"merge_method: {method}"] + ([f"base_model: {base}"] if has_base else [])
    lines.append("models:")
    for m in inputs:
        lines.append(f"  - model: {m}" + (f"\n    parameters: {{{per}}}" if per else ""))
    if shared:
        lines.append(f"parameters: {{{shared}}}")
    lines.append("dtype: bfloat16")
    return "\n".join(lines) + "\n"


def n_inputs(method: str) -> int:
    has_base, n, _, _ = METHODS[method]
    return n + int(has_base)


def bench(size: str, work: str, mergekit_python: str | None,
          methods: tuple[str, ...] = ("task_arithmetic", "ties"), basic: bool = True
          ) -> list[dict]:
    dirs = [os.path.join(work, f"{size}-m{i}") for i in range(3)]
    for i, d in enumerate(dirs):
        make_checkpoint(d, size, seed=i)
    nbytes = dir_bytes(dirs[0])
    cli = [sys.executable, "-m", "jaxarith"]
    rows = []

    def row(name, cmd, read, out):
        secs, rss = timed(cmd)
        written = dir_bytes(out) if os.path.isdir(out) else os.path.getsize(out)
        rows.append({"size": size, "op": name, "seconds": secs, "peak_rss_gib": rss,
                     "bytes_read": read, "bytes_written": written,
                     "gb_per_s": (read + written) / secs / 1e9})
        if os.path.isdir(out):
            shutil.rmtree(out)

    out = os.path.join(work, "out")
    if not basic:
        methods_only(rows, row, cli, work, dirs, nbytes, out, mergekit_python, methods)
        for d in dirs:
            shutil.rmtree(d)
        return rows
    copy = ("import shutil, sys, os; os.makedirs(sys.argv[2]); "
            "[shutil.copyfile(os.path.join(sys.argv[1], f), os.path.join(sys.argv[2], f)) "
            "for f in os.listdir(sys.argv[1]) if f.endswith('.safetensors')]")
    row("file copy (1 model)", [sys.executable, "-c", copy, dirs[0], out], nbytes, out)
    row("delta extract", [*cli, "delta", "extract", dirs[1], dirs[0], out, "--json"],
        2 * nbytes, out)
    delta_dir = os.path.join(work, f"{size}-delta")
    subprocess.run([*cli, "delta", "extract", dirs[1], dirs[0], delta_dir, "--json"],
                   check=True, capture_output=True)
    row("delta apply", [*cli, "delta", "apply", dirs[0], delta_dir, out, "--json"],
        nbytes + dir_bytes(delta_dir), out)
    shutil.rmtree(delta_dir)
    methods_only(rows, row, cli, work, dirs, nbytes, out, mergekit_python, methods)
    for d in dirs:
        shutil.rmtree(d)
    return rows


def methods_only(rows, row, cli, work, dirs, nbytes, out, mergekit_python, methods) -> None:
    """Each method by jaxarith, then by mergekit (same YAML), one fresh process each."""
    for method in methods:
        cfg = os.path.join(work, f"{method}.yaml")
        with open(cfg, "w") as fh:
            fh.write(mergekit_yaml(method, dirs[0], dirs[1:]))
        k = n_inputs(method)
        row(f"{method} ({k} models)", [*cli, "merge", cfg, out, "--json"], k * nbytes, out)
        if mergekit_python:
            mk = os.path.join(os.path.dirname(mergekit_python), "mergekit-yaml")
            row(f"mergekit {method}", [mk, cfg, out, "--out-shard-size", "1B"], k * nbytes, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (< 1 min)")
    ap.add_argument("--sizes", default=None, help="comma list of " + ",".join(SIZES))
    ap.add_argument("--mergekit", default=sys.executable, metavar="PYTHON",
                    help="python of a venv with mergekit (default: this one; 'none' skips it)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--methods", default="task_arithmetic,ties",
                    help="comma list of merge methods (" + ",".join(METHODS) + "), or 'new' "
                    "for the methods added in wave 3; with --methods-only the delta and copy "
                    "rows are skipped")
    ap.add_argument("--methods-only", action="store_true",
                    help="only the merges (no file copy, delta extract / apply rows)")
    ap.add_argument("--out", default="bench_results/arith.json")
    args = ap.parse_args()
    methods = NEW_METHODS if args.methods == "new" else tuple(args.methods.split(","))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    mergekit_yaml_bin = os.path.join(os.path.dirname(args.mergekit), "mergekit-yaml")
    if args.mergekit == "none" or not os.path.exists(mergekit_yaml_bin):
        if args.mergekit != "none":
            print(f"no mergekit-yaml beside {args.mergekit}: mergekit rows skipped")
        args.mergekit = None
    machine = benchenv.start(quick=args.quick, torch_peak=False)
    sizes = ["tiny"] if args.quick else (args.sizes or "0.5B,1B").split(",")
    work = args.work or tempfile.mkdtemp(prefix="bench_arith-")
    os.makedirs(work, exist_ok=True)
    rows = []
    for s in sizes:
        rows += bench(s, work, args.mergekit, methods, basic=not args.methods_only)
    mk = {(r["size"], r["op"].split()[1]): r for r in rows if r["op"].startswith("mergekit")}
    for r in rows:
        ref = mk.get((r["size"], r["op"].split()[0]))
        r["speedup_vs_mergekit"] = ref["seconds"] / r["seconds"] if ref and ref is not r \
            else None
    machine = benchenv.finish(machine)
    for r in rows:
        r["fraction_of_copy_bandwidth"] = r["gb_per_s"] / machine["copy_gb_s"]
    print(benchenv.describe(machine))
    print(f"{'size':>5} {'op':<26} {'s':>8} {'peak GiB':>9} {'GB/s':>7} {'% copy':>7} "
          f"{'x mergekit':>10}")
    for r in rows:
        sp = f"{r['speedup_vs_mergekit']:.2f}" if r["speedup_vs_mergekit"] else "-"
        print(f"{r['size']:>5} {r['op']:<26} {r['seconds']:8.2f} {r['peak_rss_gib']:9.2f} "
              f"{r['gb_per_s']:7.3f} {r['fraction_of_copy_bandwidth']:7.1%} {sp:>10}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": machine, "rows": rows, "mergekit": args.mergekit}, fh, indent=2)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
