"""Distillation step throughput: the live-teacher step and the cached-top-k step vs the plain step.

The same student, batch and sequence length; teachers of 1x, 2x and 4x the student's matmul
parameters (same width, 1x/2x/4x the layers). The FLOP model predicts the distillation step's
time as ``(F_S + F_T / 3) / F_S`` times the plain step's, with ``F = 6N + 6 L T d_attn`` per token
(train/metrics.py) for the student's forward+backward and a third of the teacher's for its
forward only. Memory: XLA's compiled memory analysis (arguments + temporaries per device) of the
live-teacher step vs the cached-top-k step. Plain, live and cached steps are timed interleaved
(round-robin, best of rounds) because the machine is shared; the load average is reported.

    .venv/bin/python scripts/bench_distill.py --quick      # tiny sizes, < 2 min
    .venv/bin/python scripts/bench_distill.py              # ~10M student, a few min
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SIZES = {
    # name: (student hf overrides, batch, seq_len, top_k)
    "tiny": (dict(vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16), 8, 128, 16),
    "small": (dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4, head_dim=64), 8, 256, 32),
}


def build(cfg, mesh, batch, seq_len, loss_fn, frozen=None, fields=None):
    from jaxarith.schedules import ScheduleConfig
    from train.config import OptimizerConfig
    from train.step import build_step, compile_step, make_optimizer

    sched = ScheduleConfig(kind="constant", peak_lr=1e-4, total_steps=1000).build()
    tx = make_optimizer(OptimizerConfig(), sched)
    shd = None if frozen is None else {k: jax_shardings(v) for k, v in frozen.items()}
    fns = build_step(cfg, mesh, tx=tx, schedule=sched, batch=batch, seq_len=seq_len,
                     loss_fn=loss_fn, frozen=frozen, frozen_shardings=shd, batch_fields=fields)
    step, info = compile_step(fns, mesh)
    return fns, step, info


def jax_shardings(tree):
    import jax

    return jax.tree.map(lambda x: x.sharding, tree)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--size", default=None, choices=list(SIZES))
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="steps per timed round")
    p.add_argument("--out", default="bench_results/distill.json")
    args = p.parse_args(argv)
    size = args.size or ("tiny" if args.quick else "small")
    rounds = args.rounds or (2 if args.quick else 3)
    steps = args.steps or (3 if args.quick else 4)

    import benchenv  # scripts/ is on sys.path when this file runs

    machine = benchenv.start(quick=args.quick, torch_peak=False)

    import jax
    import numpy as np

    from jaxarith.distill import losses as D
    from jaxarith.models import transformer
    from jaxarith.models.config import config_from_hf
    from jaxarith.sharding import make_mesh
    from jaxarith.testing import tiny_llama_config
    from train import distill as TD
    from train.metrics import flops_per_token, matmul_params
    from train.step import init_state, next_token_loss_fn, scratch_params

    over, batch, seq_len, k = SIZES[size]
    mesh = make_mesh("fsdp=1", jax.devices()[:1])
    student = config_from_hf(tiny_llama_config(max_position_embeddings=seq_len, **over).to_dict())
    f_s = flops_per_token(student, seq_len)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, student.vocab_size, (1, batch, seq_len), np.int32)
    opts = D.DistillLoss(loss="forward_kl", temperature=1.0, alpha=0.5)

    progs = {}  # name -> (step, state, batch)
    fns, step, info = build(student, mesh, batch, seq_len, next_token_loss_fn(student))
    progs["plain"] = (step, init_state(fns, scratch_params(student, 0, mesh), mesh),
                      {"tokens": jax.device_put(tokens, fns.batch_sharding["tokens"])}, info)
    rows_meta = {}
    for mult in (1, 2, 4):
        t_over = dict(over, num_hidden_layers=over["num_hidden_layers"] * mult)
        teacher = config_from_hf(tiny_llama_config(max_position_embeddings=seq_len,
                                                   **t_over).to_dict())
        t_params = transformer.init_params(teacher, jax.random.key(mult))
        frozen = {TD.NAME: t_params}
        loss_fn = TD.make_loss_fn(student, opts, teacher_cfg=teacher)
        fns, step, info = build(student, mesh, batch, seq_len, loss_fn, frozen)
        progs[f"live{mult}x"] = (step, init_state(fns, scratch_params(student, 0, mesh), mesh,
                                                  frozen=frozen),
                                 {"tokens": jax.device_put(tokens, fns.batch_sharding["tokens"])},
                                 info)
        rows_meta[mult] = {"teacher_params": matmul_params(teacher),
                           "f_t": flops_per_token(teacher, seq_len)}
    # cached top-k: the teacher's top-k comes with the batch
    top = D.teacher_topk(jax.random.normal(jax.random.key(0), (batch, seq_len,
                                                                student.vocab_size)), k)
    fields = {"tokens": ((), "int32"), **TD.cache_batch_fields(k)}
    loss_fn = TD.make_loss_fn(student, dataclasses.replace(opts, top_k=k), cached=True)
    fns, step, info = build(student, mesh, batch, seq_len, loss_fn, fields=fields)
    cb = {"tokens": tokens, "teacher_ids": np.asarray(top.ids)[None],
          "teacher_logp": np.asarray(top.logp)[None], "teacher_rest": np.asarray(top.rest)[None]}
    progs["cached"] = (step, init_state(fns, scratch_params(student, 0, mesh), mesh),
                       {n: jax.device_put(v, fns.batch_sharding[n]) for n, v in cb.items()}, info)

    best = {n: float("inf") for n in progs}
    states = {n: v[1] for n, v in progs.items()}
    for n, (step, _, b, _) in progs.items():  # warm up
        states[n], m = step(states[n], b)
        jax.block_until_ready(m)
    for _ in range(rounds):
        for n, (step, _, b, _) in progs.items():
            t = time.perf_counter()
            for _ in range(steps):
                states[n], m = step(states[n], b)
                float(m["loss"])
            best[n] = min(best[n], (time.perf_counter() - t) / steps)
    tps = {n: batch * seq_len / best[n] for n in best}

    def mem(info):
        m = info["memory"]
        return m.get("argument_size_in_bytes", 0) + m.get("temp_size_in_bytes", 0)

    rows = []
    for mult, meta in rows_meta.items():
        pred = (f_s + meta["f_t"] / 3) / f_s
        meas = best[f"live{mult}x"] / best["plain"]
        rows.append({"teacher": f"{mult}x", "teacher_params": meta["teacher_params"],
                     "tokens_per_s": tps[f"live{mult}x"], "measured_ratio": meas,
                     "predicted_ratio": pred, "error": meas / pred - 1,
                     "memory_bytes": mem(progs[f"live{mult}x"][3])})
    load = os.getloadavg()
    machine = benchenv.finish(machine)
    print(benchenv.describe(machine))
    print(f"student {size}: {matmul_params(student) / 1e6:.2f}M matmul params, batch {batch} x "
          f"{seq_len}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"plain step: {tps['plain']:.0f} tok/s, memory {mem(progs['plain'][3]) / 2**20:.1f} MiB")
    print(f"cached top-{k}: {tps['cached']:.0f} tok/s ({best['cached'] / best['plain']:.2f}x "
          f"the plain step's time), memory {mem(progs['cached'][3]) / 2**20:.1f} MiB")
    head = (f"{'teacher':<8} {'params':>8} {'tok/s':>8} {'time ratio':>10} {'FLOP ratio':>10} "
            f"{'error':>7} {'memory':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['teacher']:<8} {r['teacher_params'] / 1e6:>7.2f}M {r['tokens_per_s']:>8.0f} "
              f"{r['measured_ratio']:>10.2f} {r['predicted_ratio']:>10.2f} {r['error']:>+7.0%} "
              f"{r['memory_bytes'] / 2**20:>7.1f} MiB")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "size": size, "quick": args.quick, "load_average": load,
                   "rows": rows,
                   "plain_tokens_per_s": tps["plain"], "cached_tokens_per_s": tps["cached"],
                   "plain_memory_bytes": mem(progs["plain"][3]),
                   "cached_memory_bytes": mem(progs["cached"][3])}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
