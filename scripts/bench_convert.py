"""Benchmark: HF <-> Orbax conversion wall time and peak RSS vs the naive route and a file copy.

For Llama checkpoints of ~0.1B, ~0.5B and ~1B parameters (random bfloat16 weights, sharded
safetensors, generated locally), each measured in a fresh subprocess (peak RSS of that process
from ``os.wait4``):

- ``hf->orbax``  : ``jaxarith convert`` (streamed, tensor by tensor)
- ``orbax->hf``  : ``jaxarith convert`` back (streamed)
- ``naive``      : ``transformers`` ``from_pretrained`` then a numpy copy of every tensor
- ``copy``       : a plain copy of the same safetensors bytes (the throughput reference)
- ``startup``    : ``python -c "import jaxarith.io.convert.route"`` (the fixed cost inside both
  conversion timings: jax, orbax, tensorstore imports)

Wall time is reported next to CPU time (user + sys of the process): on a shared machine the wall
time mostly measures the other tenants.

Targets (issue 3): peak RSS < 1.5 GB + 2x the largest tensor at every size; throughput at least
50% of the plain copy.

    python scripts/bench_convert.py            # 0.1B, 0.5B, 1B
    python scripts/bench_convert.py --quick    # one tiny size, < 1 min
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

from jaxarith.io.convert.safetensors_io import write_safetensors

SIZES = {  # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "0.1B": (768, 2048, 12, 12, 4, 32000),
    "0.5B": (1536, 4096, 16, 12, 4, 32000),
    "1B": (2048, 8192, 16, 32, 8, 128256),
}
QUICK = {"tiny": (256, 512, 4, 4, 2, 4096)}


def make_checkpoint(directory: str, dims, shard_bytes: int = 1 << 30) -> tuple[int, int]:
    """Write a random bf16 Llama checkpoint; returns (total bytes, largest tensor bytes)."""
    d, f, L, n, k, v = dims
    h = d // n
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": v,
           "hidden_size": d, "intermediate_size": f, "num_hidden_layers": L,
           "num_attention_heads": n, "num_key_value_heads": k, "head_dim": h,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
           "eos_token_id": 2}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    specs = [("model.embed_tokens.weight", (v, d)), ("model.norm.weight", (d,)),
             ("lm_head.weight", (v, d))]
    for i in range(L):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (d,)),
                  (p + "post_attention_layernorm.weight", (d,)),
                  (p + "self_attn.q_proj.weight", (n * h, d)),
                  (p + "self_attn.k_proj.weight", (k * h, d)),
                  (p + "self_attn.v_proj.weight", (k * h, d)),
                  (p + "self_attn.o_proj.weight", (d, n * h)),
                  (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                  (p + "mlp.down_proj.weight", (d, f))]
    rng = np.random.default_rng(0)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    shards, cur, size = [], [], 0
    for name, shape in specs:
        nbytes = int(np.prod(shape)) * 2
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape, bf16))
        size += nbytes
    shards.append(cur)
    weight_map = {}
    for s, part in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = ((0.02 * rng.standard_normal(shape, np.float32)).astype(bf16)
                  for _, shape, _ in part)
        write_safetensors(os.path.join(directory, fname), part, arrays)
        weight_map.update({name: fname for name, _, _ in part})
    total = sum(int(np.prod(sh)) * 2 for _, sh in specs)
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    return total, max(int(np.prod(sh)) * 2 for _, sh in specs)


NAIVE = """
import sys, numpy as np, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
copy = {k: v.float().numpy().copy() for k, v in m.state_dict().items()}
"""


def run(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (GB) of one subprocess (its rusage, via wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"{cmd} failed with status {status}")
    # ru_maxrss is in KiB on Linux
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None,
                    help="JSON output (default bench_results/convert.json, "
                         "bench_results/convert_quick.json with --quick)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    sizes = QUICK if args.quick else SIZES
    args.out = args.out or f"bench_results/convert{'_quick' if args.quick else ''}.json"
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    py, rows = sys.executable, []
    machine = benchenv.start(quick=args.quick, torch_peak=False)
    t_start, cpu_start, _ = run([py, "-c", "import jaxarith.io.convert.route"])
    try:
        for name, dims in sizes.items():
            src = os.path.join(work, f"hf-{name}")
            total, largest = make_checkpoint(src, dims)
            orbax, back, copy = (os.path.join(work, f"{x}-{name}") for x in ("orbax", "back",
                                                                              "copy"))
            cli = [py, "-m", "jaxarith", "convert"]
            t_copy, cpu_copy, _ = run(["cp", "-r", src, copy])
            t_naive, cpu_naive, rss_naive = run([py, "-c", NAIVE, src])
            t_h2o, cpu_h2o, rss_h2o = run(cli + [src, orbax, "--json"])
            t_o2h, cpu_o2h, rss_o2h = run(cli + [orbax, back, "--json"])
            limit = 1.5 + 2 * largest / 1e9
            row = {
                "model": name, "gb": total / 1e9, "largest_tensor_gb": largest / 1e9,
                "copy_s": t_copy, "copy_cpu_s": cpu_copy,
                "naive_s": t_naive, "naive_cpu_s": cpu_naive, "naive_rss_gb": rss_naive,
                "hf_to_orbax_s": t_h2o, "hf_to_orbax_cpu_s": cpu_h2o,
                "hf_to_orbax_rss_gb": rss_h2o,
                "orbax_to_hf_s": t_o2h, "orbax_to_hf_cpu_s": cpu_o2h,
                "orbax_to_hf_rss_gb": rss_o2h,
                "rss_limit_gb": limit,
                "hf_to_orbax_vs_copy": t_copy / t_h2o, "orbax_to_hf_vs_copy": t_copy / t_o2h,
                "rss_target_met": max(rss_h2o, rss_o2h) < limit,
                "throughput_target_met": min(t_copy / t_h2o, t_copy / t_o2h) >= 0.5,
            }
            rows.append(row)
            for d in (orbax, back, copy):
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    machine = benchenv.finish(machine)
    print(benchenv.describe(machine))
    print(f"startup (import jaxarith.io.convert.route): {t_start:.2f} s wall, "
          f"{cpu_start:.2f} s CPU")
    print("times: wall s / CPU s; RSS: peak GB of the process")
    hdr = (f"{'model':>7} {'GB':>5} {'copy':>11} {'naive':>11} {'RSS':>5} {'HF->Orbax':>11} "
           f"{'RSS':>5} {'Orbax->HF':>11} {'RSS':>5} {'limit':>5} {'h->o/cp':>7} {'o->h/cp':>7}")
    print(hdr)
    for r in rows:
        print(f"{r['model']:>7} {r['gb']:5.2f} {r['copy_s']:5.2f}/{r['copy_cpu_s']:5.2f} "
              f"{r['naive_s']:5.1f}/{r['naive_cpu_s']:5.1f} {r['naive_rss_gb']:5.2f} "
              f"{r['hf_to_orbax_s']:5.1f}/{r['hf_to_orbax_cpu_s']:5.1f} "
              f"{r['hf_to_orbax_rss_gb']:5.2f} "
              f"{r['orbax_to_hf_s']:5.1f}/{r['orbax_to_hf_cpu_s']:5.1f} "
              f"{r['orbax_to_hf_rss_gb']:5.2f} {r['rss_limit_gb']:5.2f} "
              f"{r['hf_to_orbax_vs_copy']:7.3f} {r['orbax_to_hf_vs_copy']:7.3f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": machine, "startup_s": t_start, "startup_cpu_s": cpu_start,
                   "quick": args.quick, "rows": rows}, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
