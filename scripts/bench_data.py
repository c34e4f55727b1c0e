"""Pre-tokenised data loader: host memory vs corpus size, and loader speed vs the train step.

1. Peak RSS of the data loader at 1x and 10x corpus size, for a ``kind: tokenized`` source
   (windows read on demand from ArrayRecord shards) and, for contrast, the in-memory ``kind: text``
   source. Each measurement runs in a fresh process: RSS after the imports and the tokenizer
   (``base``), then the loader is built and a fixed number of batches drawn; ``peak`` is
   ``ru_maxrss``. The corpus is the bundled text (code + docs, ~1 MB) repeated, written offline.
2. Loader tokens/s (one process, no workers, batches of the config's global batch and seq_len)
   vs what the training step consumes at the tiny config (configs/tiny_llama.yaml) and the ~100M
   one (configs/gpt2_124m_scratch.yaml's model): the step's tokens/s is bounded by this machine's
   float32 matmul peak (measured here, scripts/benchenv.py) / FLOPs per token (train/metrics.py),
   i.e. the step at 100% MFU; the loader must be faster than that bound.

    .venv/bin/python scripts/bench_data.py --quick     # ~2 MB vs ~20 MB corpus, < 1 min
    .venv/bin/python scripts/bench_data.py             # ~10 MB vs ~100 MB, a few minutes
    .venv/bin/python scripts/bench_data.py --out bench_results/data.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(__file__))

CONFIGS = {"tiny": "configs/tiny_llama.yaml", "gpt2-124M": "configs/gpt2_124m_scratch.yaml"}


def _status_mb(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MB (/proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(kind: str, path: str, seq_len: int, batch: int, batches: int) -> dict:
    """In a fresh process: build the loader over one source and draw ``batches`` batches."""
    from jaxarith import data
    from jaxarith.data.assets import bundled_tokenizer

    tok = bundled_tokenizer()
    tok(["warm up"], add_special_tokens=False)
    base = _status_mb("VmRSS")
    cfg = data.DataConfig(sources=[data.SourceConfig(name="c", kind=kind, path=path)],
                          seq_len=seq_len, eval_fraction=0.0)
    t0 = time.perf_counter()
    sources = data.load_sources(cfg, tok)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()  # from the iterator's creation: grain prefetches in threads
    it = data.batch_iterator(data.mixed_dataset(sources, 0), batch)
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    return {"kind": kind, "windows": len(sources[0].train), "base_mb": round(base, 1),
            "rss_mb": round(_status_mb("VmRSS"), 1), "peak_mb": round(_status_mb("VmHWM"), 1),
            "load_s": round(load_s, 3),
            "tokens_per_s": batches * batch * seq_len / dt}


def _run_child(*args) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], env=env,
                       capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"child {args} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_corpus(path: str, repeat: int) -> int:
    from jaxarith.data.assets import CORPUS_CODE, CORPUS_DOCS

    text = "\n\n".join(open(p, encoding="utf-8").read() for p in (CORPUS_CODE, CORPUS_DOCS))
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            f.write(text + "\n\n")
    return os.path.getsize(path)


def tokenize(src: str, out: str, seq_len: int) -> dict:
    from jaxarith.data import tokenized

    t0 = time.perf_counter()
    m = tokenized.tokenize_to_dir([src], out, tokenizer_ref="bundled", seq_len=seq_len,
                                  eval_fraction=0.0)
    dt = time.perf_counter() - t0
    return {"tokens": m["splits"]["train"]["tokens"], "seconds": round(dt, 2),
            "tokens_per_s": m["splits"]["train"]["tokens"] / dt}


def step_consumption(name: str, peak_flops: float) -> dict:
    from train import loop, metrics
    from train.config import load_train_config

    cfg = load_train_config(os.path.join(ROOT, CONFIGS[name]), ["out=unused"])
    mcfg, _ = loop.model_config(cfg)
    fpt = metrics.flops_per_token(mcfg, cfg.data.seq_len)
    return {"batch": cfg.batch, "seq_len": cfg.data.seq_len, "flops_per_token": fpt,
            "step_tokens_per_s_at_peak": peak_flops / fpt,
            "params_m": round(metrics.matmul_params(mcfg) / 1e6, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small corpus, few batches")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child", nargs=5, metavar=("KIND", "PATH", "SEQ", "BATCH", "N"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, path, seq, batch, n = args.child
        print(json.dumps(child(kind, path, int(seq), int(batch), int(n))))
        return 0

    import benchenv

    env = benchenv.start(quick=args.quick, torch_peak=False)
    peak = env["jax_matmul_peak_gflops"] * 1e9
    base_repeat = 2 if args.quick else 10
    batches = 50 if args.quick else 200
    rows: dict = {"memory": [], "throughput": []}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        seq_len = 128
        for scale in (1, 10):
            src = os.path.join(tmp, f"corpus_{scale}x.txt")
            size = make_corpus(src, base_repeat * scale)
            tok = tokenize(src, os.path.join(tmp, f"tok_{scale}x_{seq_len}"), seq_len)
            for kind, path in (("tokenized", os.path.join(tmp, f"tok_{scale}x_{seq_len}")),
                               ("text", src)):
                r = _run_child(kind, path, seq_len, 16, batches)
                rows["memory"].append({"scale": scale, "corpus_mb": round(size / 2**20, 1),
                                       "tokenize_tokens_per_s": round(tok["tokens_per_s"]),
                                       **r})
        for name in CONFIGS:
            c = step_consumption(name, peak)
            src = os.path.join(tmp, "corpus_1x.txt")
            out = os.path.join(tmp, f"tok_1x_{c['seq_len']}")
            if not os.path.exists(out):
                tokenize(src, out, c["seq_len"])
            n = max(4, (batches * 16) // c["batch"])  # the same number of windows
            r = _run_child("tokenized", out, c["seq_len"], c["batch"], n)
            rows["throughput"].append({"config": name, **c,
                                       "loader_tokens_per_s": r["tokens_per_s"],
                                       "headroom": r["tokens_per_s"] /
                                       c["step_tokens_per_s_at_peak"]})
    env = benchenv.finish(env)

    print(benchenv.describe(env))
    print("\nloader RSS (MB) vs corpus size; base = after imports + tokenizer, rss = after "
          f"building the loader and {batches} batches of 16 x 128, peak = high-water mark")
    print(f"{'source':10} {'scale':>5} {'corpus MB':>9} {'windows':>8} {'base':>7} {'rss':>7} "
          f"{'rss-base':>8} {'peak':>7} {'load s':>7} {'tokenize tok/s':>14}")
    for r in rows["memory"]:
        print(f"{r['kind']:10} {r['scale']:>4}x {r['corpus_mb']:>9} {r['windows']:>8} "
              f"{r['base_mb']:>7} {r['rss_mb']:>7} {r['rss_mb'] - r['base_mb']:>8.1f} "
              f"{r['peak_mb']:>7} {r['load_s']:>7} {r['tokenize_tokens_per_s']:>14.3g}")
    print("\nloader tokens/s vs the train step's consumption (step at 100% MFU of this CPU's "
          "float32 matmul peak)")
    print(f"{'config':10} {'params M':>8} {'batch x T':>11} {'loader tok/s':>13} "
          f"{'step tok/s':>11} {'headroom':>9}")
    for r in rows["throughput"]:
        print(f"{r['config']:10} {r['params_m']:>8} {r['batch']:>5} x {r['seq_len']:<5} "
              f"{r['loader_tokens_per_s']:>13.3g} {r['step_tokens_per_s_at_peak']:>11.3g} "
              f"{r['headroom']:>8.1f}x")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"machine": env, "quick": args.quick, **rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
