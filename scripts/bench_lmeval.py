"""Benchmark: lm-eval requests/s of ``model="jaxarith"`` vs lm-eval's ``hf`` backend.

Same random-weight Llama models for both sides (made locally with transformers, the bundled
tokenizer), float32, this CPU, the same batch size. Two shipped tasks: ``jaxarith_mc``
(multiple choice: 4 loglikelihood requests per document) and ``jaxarith_ppl`` (rolling
perplexity: one request per document, several windows each). Each side runs the task through
``lm_eval.simple_evaluate`` (the same lm-eval overhead on both sides) once to warm up (jaxarith
compiles its length buckets there), then ``--repeats`` timed runs, the two sides interleaved;
the median is reported, end to end (``simple_evaluate``) and for the model's request methods
alone (lm-eval's fixed per-run work, ~0.3 s here, is the same for every model and weighs on
these small tasks). The per-request answers of the two sides are compared (max abs
difference of the log-likelihoods, identical ``is_greedy``). The machine (CPU, peaks, load
average at start and end: ``scripts/benchenv.py``) is recorded; on a busy machine rerun before
quoting a ratio.

    python scripts/bench_lmeval.py --quick     # a tiny model, few documents (< 1 min)
    python scripts/bench_lmeval.py             # ~16M and ~100M Llamas (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import benchenv  # noqa: E402  (scripts/ is on sys.path when this file runs)
import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from jaxarith import testing  # noqa: E402
from jaxarith.eval.lmeval import JaxarithLM  # noqa: E402
from jaxarith.eval.lmeval.run import task_manager  # noqa: E402

SIZES = {  # name: hidden, intermediate, layers, heads, kv heads, vocab, context
    "16M": (256, 768, 4, 8, 4, 32000, 512),
    "100M": (768, 2048, 12, 12, 4, 32000, 512),
}
QUICK = {"tiny": (64, 128, 2, 4, 2, 1024, 128)}
TASKS = ("jaxarith_mc", "jaxarith_ppl")


def make_model(directory: str, size) -> int:
    hidden, inter, layers, heads, kv, vocab, ctx = size
    cfg = testing.tiny_llama_config(hidden_size=hidden, intermediate_size=inter,
                                    num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv, head_dim=hidden // heads,
                                    vocab_size=vocab, max_position_embeddings=ctx)
    model = testing.make_hf_model(directory, cfg)
    return sum(p.numel() for p in model.parameters())


def timed(lm) -> list[float]:
    """Make ``lm``'s request methods add their wall time to the returned list (the model's own
    share of a run: lm-eval's fixed per-run work, e.g. its environment report, is outside)."""
    spent = [0.0]
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        fn = getattr(lm, name)

        def wrapper(*a, _fn=fn, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t0
        setattr(lm, name, wrapper)
    return spent


def run(lm, tm, task, docs, spent):
    """(seconds, seconds inside the model's request methods, per-request answers) of one
    simple_evaluate over ``docs`` of ``task``."""
    before = spent[0]
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm,
                                  samples={task: docs}, log_samples=True, bootstrap_iters=0)
    seconds = time.perf_counter() - t0
    answers = [r[0] for s in out["samples"][task] for r in s["resps"]]
    return seconds, spent[0] - before, answers


def compare(a, b) -> dict:
    if isinstance(a[0], tuple | list):
        diff = max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True))
        return {"max_abs_diff": diff, "is_greedy_equal": [x[1] for x in a] == [y[1] for y in b]}
    return {"max_abs_diff": max(abs(x - y) for x, y in zip(a, b, strict=True))}


def bench_size(name, size, tm, docs, batch_size, repeats) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        n_params = make_model(d, size)
        sides = {"hf": HFLM(pretrained=d, dtype="float32", device="cpu", batch_size=batch_size),
                 "jaxarith": JaxarithLM(pretrained=d, batch_size=batch_size)}
        spent = {k: timed(lm) for k, lm in sides.items()}
        for task in TASKS:
            answers, times = {}, {k: [] for k in sides}
            inside = {k: [] for k in sides}
            for r in range(repeats + 1):  # round 0 warms up (jaxarith compiles)
                for side, lm in sides.items():
                    seconds, model_s, answers[side] = run(lm, tm, task, docs[task], spent[side])
                    if r:
                        times[side].append(seconds)
                        inside[side].append(model_s)
            n = len(answers["hf"])
            rps = {k: n / float(np.median(v)) for k, v in times.items()}
            model = {k: n / float(np.median(v)) for k, v in inside.items()}
            row = {"size": name, "params": n_params, "task": task, "requests": n,
                   "hf_requests_per_s": rps["hf"], "jaxarith_requests_per_s": rps["jaxarith"],
                   "speedup": rps["jaxarith"] / rps["hf"],
                   "hf_model_requests_per_s": model["hf"],
                   "jaxarith_model_requests_per_s": model["jaxarith"],
                   "model_speedup": model["jaxarith"] / model["hf"],
                   **compare(answers["hf"], answers["jaxarith"])}
            print(f"{name:>5} {task:<13} {n:>4} requests  hf {rps['hf']:8.2f}/s  jaxarith "
                  f"{rps['jaxarith']:8.2f}/s  x{row['speedup']:.2f}  (model calls only: "
                  f"x{row['model_speedup']:.2f})  max|diff| {row['max_abs_diff']:.2e}",
                  flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model and few documents")
    ap.add_argument("--out", default="bench_results/lmeval.json")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 3; 1 quick)")
    args = ap.parse_args()
    sizes = QUICK if args.quick else SIZES
    repeats = args.repeats or (1 if args.quick else 3)
    docs = ({"jaxarith_mc": list(range(8)), "jaxarith_ppl": list(range(4))} if args.quick else
            {"jaxarith_mc": list(range(24)), "jaxarith_ppl": list(range(12))})
    tm = task_manager(list(TASKS))
    machine = benchenv.start(quick=args.quick)
    print(benchenv.describe(machine), flush=True)
    rows = []
    for name, size in sizes.items():
        rows += bench_size(name, size, tm, docs, args.batch_size, repeats)
    machine = benchenv.finish(machine)
    print(benchenv.describe(machine))
    result = {"machine": machine, "rows": rows, "batch_size": args.batch_size,
              "repeats": repeats, "quick": args.quick}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
