"""Benchmark: tokens/s of the jitted forward + loss vs transformers PyTorch, same CPU, same model.

For two Llama models made locally (~20M and ~100M parameters, random weights, float32), the
same weights are timed in one process, same batch, same threads:

- ``jax``   : ``jax.jit`` of ``jaxarith.models.transformer.next_token_loss`` (mean NLL),
  compiled ahead of time (compile time reported separately, never in the timings);
- ``torch`` : ``model(input_ids, labels=input_ids).loss`` under ``torch.no_grad()``
  (transformers ``LlamaForCausalLM``, its default attention implementation).

Calls alternate jax / torch inside each repeat so that load from other processes hits both
alike; each call ends with ``block_until_ready`` / a host read of the loss; the median is
reported. Both losses are also compared (same weights => same number up to float32 rounding).

FLOPs of one forward (the PaLM convention, without the softmax/norm/elementwise work)::

    flops = 2 * N_matmul * B * T  +  4 * L * B * T^2 * (num_heads * head_dim)

where N_matmul counts every weight used in a matmul (all blocks plus ``lm_head``, or the tied
embedding used as ``lm_head``; the input-embedding gather is not counted), and the second term
is QK^T plus PV over the full T x T score matrix (causal masking is not subtracted, as in PaLM).
MFU = flops / seconds / peak, with peak the best float32 matmul rate of this CPU measured in the
same run (jax's or torch's, whichever is higher; ``scripts/benchenv.py``; ``--peak-gflops`` to
override).

    python scripts/bench_forward.py              # ~20M and ~100M, batch 4 x 512
    python scripts/bench_forward.py --quick      # tiny sizes, < 1 min
    python scripts/bench_forward.py --dump-hlo bench_results/hlo   # also save the compiled HLO
    python scripts/bench_forward.py --sizes 100M --profile /tmp/fwd_trace  # + per-op XLA times

``--profile`` traces one extra jax call (after the timings) with ``jax.profiler`` and prints the
XLA CPU ops (thunks) taking the most time, with their result shapes and the fused ops inside.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

# One CPU device for the whole process, whatever the caller's shell had (the test suite uses 8
# fake devices, which would split the cores between them).
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count"))

import benchenv  # noqa: E402  (scripts/ is on sys.path when this file runs)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SIZES = {  # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "20M": (384, 1024, 8, 6, 2, 8192),
    "100M": (768, 2048, 8, 12, 4, 32000),
}
QUICK = {"tiny-a": (64, 128, 2, 4, 2, 1024), "tiny-b": (128, 256, 2, 4, 2, 2048)}


def hf_llama_config(dims, seq_len: int):
    """A ``transformers.LlamaConfig`` (untied, GQA, no biases) for ``dims``."""
    from jaxarith.testing import tiny_llama_config

    d, f, n_layers, heads, kv_heads, vocab = dims
    return tiny_llama_config(vocab_size=vocab, hidden_size=d, intermediate_size=f,
                             num_hidden_layers=n_layers, num_attention_heads=heads,
                             num_key_value_heads=kv_heads, head_dim=d // heads,
                             max_position_embeddings=max(seq_len, 128), rope_theta=500000.0)


def forward_flops(cfg, batch: int, seq_len: int) -> tuple[int, int]:
    """(FLOPs of one forward, matmul parameter count N_matmul); formula in the module docstring."""
    from jaxarith.models.transformer import num_params

    n_matmul = num_params(cfg)
    n_matmul -= cfg.num_hidden_layers * 2 * cfg.hidden_size + cfg.hidden_size  # norm scales
    if not cfg.tie_word_embeddings:
        n_matmul -= cfg.vocab_size * cfg.hidden_size  # the input gather is not a matmul
    attn = 4 * cfg.num_hidden_layers * batch * seq_len**2 * cfg.num_attention_heads * cfg.head_dim
    return 2 * n_matmul * batch * seq_len + attn, n_matmul


def make_jax_loss(cfg):
    """The jitted function timed: mean next-token NLL of ``tokens`` [B, T] (float32)."""
    from jaxarith.models.transformer import next_token_loss

    @jax.jit
    def loss(params, tokens):
        nll, count = next_token_loss(params, cfg, tokens, dtype=jnp.float32)
        return nll / count

    return loss


def bench_one(name: str, dims, args, workdir: str) -> dict:
    """Build one model, load the same weights into both frameworks, time them interleaved."""
    import torch

    from jaxarith.io.convert.hf import load_hf_params
    from jaxarith.models.transformer import num_params
    from jaxarith.testing import make_hf_model

    hf_cfg = hf_llama_config(dims, args.seq)
    directory = os.path.join(workdir, name)
    model = make_hf_model(directory, hf_cfg, seed=0, dtype="float32", with_tokenizer=False)
    cfg, params = load_hf_params(directory, dtype=jnp.float32, progress=False)
    jax.block_until_ready(params)

    rng = np.random.default_rng(0)
    tokens_np = rng.integers(3, cfg.vocab_size, size=(args.batch, args.seq), dtype=np.int64)
    tokens_pt = torch.from_numpy(tokens_np)
    tokens_jx = jax.device_put(tokens_np.astype(np.int32))

    t0 = time.perf_counter()
    compiled = make_jax_loss(cfg).lower(params, tokens_jx).compile()
    compile_s = time.perf_counter() - t0
    if args.dump_hlo:
        os.makedirs(args.dump_hlo, exist_ok=True)
        with open(os.path.join(args.dump_hlo, f"forward_{name}.hlo.txt"), "w") as fh:
            fh.write(compiled.as_text())

    def run_jax() -> float:
        return float(jax.block_until_ready(compiled(params, tokens_jx)))

    def run_torch() -> float:
        with torch.no_grad():
            return float(model(input_ids=tokens_pt, labels=tokens_pt).loss)

    for _ in range(args.warmup):
        loss_jax, loss_torch = run_jax(), run_torch()
    times = {"jax": [], "torch": []}
    for _ in range(args.repeats):
        for label, fn in (("jax", run_jax), ("torch", run_torch)):
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)

    if args.profile:
        print(f"--- {name}: XLA ops by total time (one traced call)")
        for line in benchenv.profile_ops(compiled, (params, tokens_jx),
                                os.path.join(args.profile, name)):
            print(line)
    flops, n_matmul = forward_flops(cfg, args.batch, args.seq)
    ntok = args.batch * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "params": num_params(cfg),
        "matmul_params": n_matmul,
        "dims": dict(zip(("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"),
                         dims, strict=True)),
        "batch": args.batch, "seq_len": args.seq, "tokens": ntok,
        "flops_per_forward": flops,
        "jax_compile_s": compile_s,
        "jax_s": med["jax"], "torch_s": med["torch"],
        "jax_times_s": times["jax"], "torch_times_s": times["torch"],
        "jax_tok_s": ntok / med["jax"], "torch_tok_s": ntok / med["torch"],
        "speedup_jax_over_torch": med["torch"] / med["jax"],
        "jax_mfu": flops / med["jax"] / (args.peak_gflops * 1e9),
        "torch_mfu": flops / med["torch"] / (args.peak_gflops * 1e9),
        "jax_gflops": flops / med["jax"] / 1e9, "torch_gflops": flops / med["torch"] / 1e9,
        "loss_jax": loss_jax, "loss_torch": loss_torch,
        "loss_abs_diff": abs(loss_jax - loss_torch),
        "torch_attn_implementation": getattr(hf_cfg, "_attn_implementation", None),
    }


def environment(threads: int) -> dict:
    import torch
    import transformers

    return {
        "cpu_count": os.cpu_count(), "affinity_cpus": len(os.sched_getaffinity(0)),
        "load_avg_1m_at_start": os.getloadavg()[0],
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "xla_cpu_threads": threads,
        "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "jax_devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, < 1 min")
    ap.add_argument("--out", default="bench_results/forward.json")
    ap.add_argument("--batch", type=int, default=None, help="default 4 (quick: 2)")
    ap.add_argument("--seq", type=int, default=None, help="default 512 (quick: 128)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls each (default 5)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: the CPUs this process may use, "
                         "which is also what XLA's CPU client uses)")
    ap.add_argument("--peak-gflops", type=float, default=0.0,
                    help="MFU denominator (default: measured in this run)")
    ap.add_argument("--sizes", default=None, help="comma list of model names to run")
    ap.add_argument("--dump-hlo", default=None, help="directory for the compiled HLO text")
    ap.add_argument("--profile", default=None,
                    help="trace directory: also print the XLA ops taking the most time")
    args = ap.parse_args()
    sizes = QUICK if args.quick else SIZES
    if args.sizes:
        unknown = set(args.sizes.split(",")) - set(sizes)
        if unknown:
            sys.exit(f"unknown --sizes {sorted(unknown)}; choose from {sorted(sizes)}")
        sizes = {k: v for k, v in sizes.items() if k in args.sizes.split(",")}
    args.batch = args.batch or (2 if args.quick else 4)
    args.seq = args.seq or (128 if args.quick else 512)
    args.repeats = args.repeats or (3 if args.quick else 5)

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    env = environment(len(os.sched_getaffinity(0)))
    machine = benchenv.start(quick=args.quick)
    if not args.peak_gflops:
        args.peak_gflops = max(machine.get("jax_matmul_peak_gflops", 0.0),
                               machine.get("torch_matmul_peak_gflops", 0.0))

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_forward_") as work:
        for name, dims in sizes.items():
            rows.append(bench_one(name, dims, args, work))

    machine = benchenv.finish(machine)
    print(benchenv.describe(machine))
    print(f"threads: torch {env['torch_num_threads']}, XLA CPU {env['xla_cpu_threads']}; "
          f"load avg at start {env['load_avg_1m_at_start']:.2f}; peak {args.peak_gflops} GFLOP/s")
    hdr = (f"{'model':>7} {'params':>8} {'BxT':>8} {'jax tok/s':>10} {'torch tok/s':>11} "
           f"{'jax/torch':>9} {'jax MFU':>8} {'torch MFU':>9} {'compile s':>9} {'|dloss|':>8}")
    print(hdr)
    for r in rows:
        print(f"{r['model']:>7} {r['params'] / 1e6:7.1f}M {r['batch']:>3}x{r['seq_len']:<4} "
              f"{r['jax_tok_s']:10.0f} {r['torch_tok_s']:11.0f} "
              f"{r['speedup_jax_over_torch']:9.2f} {r['jax_mfu']:8.1%} {r['torch_mfu']:9.1%} "
              f"{r['jax_compile_s']:9.2f} {r['loss_abs_diff']:8.1e}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"environment": env, "machine": machine, "peak_gflops": args.peak_gflops,
                   "quick": args.quick, "rows": rows}, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
