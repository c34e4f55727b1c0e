"""Benchmark ``jaxarith average --method uniform``: peak host memory against the number of inputs.

Generates float32 Llama-shaped HF checkpoints (random weights, written with numpy), then runs
``jaxarith average`` over the first N of them, each run in a fresh process, and reports the peak
RSS of that process next to the size of one checkpoint and of its largest tensor. The streamed
mean reads the inputs one after another for each tensor, so the peak should stay flat as N grows
(the in-memory soup, ``--in-memory-soup``, loads all N models and grows by one model per input).

    python scripts/bench_average.py --quick          # ~8 MB models, N = 2, 4, 8  (~1 min)
    python scripts/bench_average.py --in-memory-soup # ~240 MB models, N = 2, 4, 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import benchenv  # scripts/ is on sys.path when this file runs
import numpy as np

SIZES = {  # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "quick": (256, 768, 4, 8, 4, 1024),
    "full": (1024, 2816, 4, 16, 4, 8192),
}
WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
        "stdout=subprocess.PIPE); sys.stderr.write(r.stdout.decode()); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
SOUP = """
import sys
from jaxarith import arith
from jaxarith.io.refs import load_model
models = [load_model(r, progress=False) for r in sys.argv[1:]]
arith.soup([m.params for m in models], models[0].config)
"""


def make_checkpoint(d: str, size: str, seed: int) -> tuple[int, int]:
    """Write a random float32 HF Llama checkpoint; returns (bytes, largest tensor bytes)."""
    import transformers

    from jaxarith.io.convert.keymap import expand, rules_for
    from jaxarith.io.convert.safetensors_io import write_safetensors
    from jaxarith.models.config import load_config

    h, f, n_layers, heads, kv, vocab = SIZES[size]
    transformers.LlamaConfig(hidden_size=h, intermediate_size=f, num_hidden_layers=n_layers,
                             num_attention_heads=heads, num_key_value_heads=kv,
                             vocab_size=vocab, tie_word_embeddings=False,
                             architectures=["LlamaForCausalLM"]).save_pretrained(d)
    cfg = load_config(d)
    rng = np.random.default_rng(seed)
    specs = [(k, r.hf_shape, np.dtype(np.float32)) for r in rules_for(cfg)
             for k, _ in expand(r, n_layers)]
    values = (rng.standard_normal(s, np.float32) * 0.02 for _, s, _ in specs)
    n = write_safetensors(os.path.join(d, "model.safetensors"), specs, values)
    return n, max(int(np.prod(s)) * 4 for _, s, _ in specs)


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB of the command run in a fresh process, seconds)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return int(r.stdout.strip().splitlines()[-1]) / 1024, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models")
    ap.add_argument("--inputs", default="2,4,8", help="numbers of inputs")
    ap.add_argument("--in-memory-soup", action="store_true",
                    help="also measure arith.soup over fully loaded models")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    size = "quick" if args.quick else "full"
    counts = [int(x) for x in args.inputs.split(",")]
    rows = []
    machine = benchenv.start(quick=args.quick, torch_peak=False)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for i in range(max(counts)):
            d = os.path.join(tmp, f"m{i}")
            nbytes, largest = make_checkpoint(d, size, i)
            dirs.append(d)
        base, _ = peak_rss_mb([sys.executable, "-c", "import jax, jaxarith.average.soups; "
                               "jax.numpy.zeros(1).block_until_ready()"])
        for n in counts:
            out = os.path.join(tmp, f"avg{n}")
            rss, secs = peak_rss_mb([sys.executable, "-m", "jaxarith", "average", *dirs[:n],
                                     out, "--method", "uniform", "--json"])
            row = {"inputs": n, "streamed_peak_rss_mb": round(rss, 1), "seconds": round(secs, 2)}
            if args.in_memory_soup:
                row["in_memory_peak_rss_mb"] = round(peak_rss_mb(
                    [sys.executable, "-c", SOUP, *dirs[:n]])[0], 1)
            rows.append(row)
    res = {"machine": benchenv.finish(machine), "size": size,
           "checkpoint_mb": round(nbytes / 2**20, 1),
           "largest_tensor_mb": round(largest / 2**20, 1),
           "baseline_rss_mb": round(base, 1), "load_average": os.getloadavg()[0], "rows": rows}
    if args.json:
        print(json.dumps(res))
    else:
        print(benchenv.describe(res["machine"]))
        print(f"{size}: one checkpoint {res['checkpoint_mb']} MB, largest tensor "
              f"{res['largest_tensor_mb']} MB, python+jax baseline {res['baseline_rss_mb']} MB, "
              f"load average {res['load_average']:.1f}")
        for r in rows:
            extra = f"   in-memory soup {r['in_memory_peak_rss_mb']:7.1f} MB" \
                if "in_memory_peak_rss_mb" in r else ""
            print(f"  N={r['inputs']:2d}: streamed peak RSS {r['streamed_peak_rss_mb']:7.1f} MB "
                  f"({r['seconds']:.1f} s){extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
