"""Training throughput: jaxarith's jitted train step vs a plain PyTorch + transformers loop.

Same Llama model shape, batch, sequence length, AdamW (weight decay 0.1, global-norm clipping
1.0), float32, random tokens; one run measures both and reports the ratio, plus MFU against this
machine's float32 matmul peak (the best of jax and torch, measured in the same run by
``scripts/benchenv.py``, with the CPU, its flags and the load average). FLOPs per token use
the formula in ``train/metrics.py`` (6N + 6 L T d_attn, causal attention at half).

    .venv/bin/python scripts/bench_train.py --quick          # tiny model, < 1 min
    .venv/bin/python scripts/bench_train.py                  # ~14M and ~100M Llama, a few min
    .venv/bin/python scripts/bench_train.py --out bench_results/train.json
    .venv/bin/python scripts/bench_train.py --sizes base-100M --profile /tmp/train_trace
    .venv/bin/python scripts/bench_train.py --bf16           # + bfloat16 compute rows
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SIZES = {
    # name: (hf config overrides, batch, seq_len)
    "tiny": (dict(vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16), 8, 128),
    "small-14M": (dict(vocab_size=8192, hidden_size=384, intermediate_size=1024,
                       num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6,
                       head_dim=64), 8, 256),
    "base-100M": (dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                       num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12,
                       head_dim=64), 4, 256),
}


def hf_config(over: dict, seq_len: int):
    from jaxarith.testing import tiny_llama_config

    return tiny_llama_config(max_position_embeddings=max(seq_len, 128), **over)


def bench_jax(hf, batch: int, seq_len: int, steps: int, warmup: int,
              profile: str | None = None, compute: str = "float32",
              attention: str = "xla") -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxarith.models.config import config_from_hf
    from jaxarith.schedules import ScheduleConfig
    from jaxarith.sharding import make_mesh
    from train.config import OptimizerConfig
    from train.step import (
        build_step,
        compile_step,
        init_state,
        make_optimizer,
        next_token_loss_fn,
        scratch_params,
    )

    cfg = config_from_hf(hf.to_dict())
    mesh = make_mesh("fsdp=1", jax.devices()[:1])
    sched = ScheduleConfig(kind="constant", peak_lr=1e-4, total_steps=steps + warmup).build()
    tx = make_optimizer(OptimizerConfig(weight_decay=0.1, clip_norm=1.0), sched)
    fns = build_step(cfg, mesh, tx=tx, schedule=sched, batch=batch, seq_len=seq_len,
                     loss_fn=next_token_loss_fn(cfg, dtype=jnp.dtype(compute),
                                                attention=attention))
    t = time.perf_counter()
    step, info = compile_step(fns, mesh)
    compile_s = time.perf_counter() - t
    state = init_state(fns, scratch_params(cfg, 0, mesh), mesh)
    rng = np.random.default_rng(0)
    batches = [jax.device_put(rng.integers(0, cfg.vocab_size, (1, batch, seq_len), np.int32),
                              fns.batch_sharding["tokens"]) for _ in range(steps + warmup)]
    for i in range(warmup):
        state, m = step(state, {"tokens": batches[i]})
    jax.block_until_ready(m)
    t = time.perf_counter()
    for i in range(warmup, warmup + steps):
        state, m = step(state, {"tokens": batches[i]})
        float(m["loss"])  # the loop reads the loss every step too
    dt = time.perf_counter() - t
    if profile:
        import benchenv

        print(f"--- XLA ops by total time (one traced step), trace under {profile}")
        # the step donates its state: trace a call on a copy of the last state
        for line in benchenv.profile_ops(step, (state, {"tokens": batches[-1]}), profile):
            print(line)
    return {"tokens_per_s": steps * batch * seq_len / dt, "compile_s": compile_s,
            "xla_flops_per_step": info["flops"], "memory": info["memory"]}


def bench_torch(hf, batch: int, seq_len: int, steps: int, warmup: int,
                compute: str = "float32", device: str = "cpu") -> dict:
    import contextlib

    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf).float().train().to(device)
    decay = [p for n, p in model.named_parameters() if "norm" not in n and "bias" not in n]
    rest = [p for n, p in model.named_parameters() if "norm" in n or "bias" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, hf.vocab_size, (batch, seq_len), generator=gen).to(device)
            for _ in range(steps + warmup)]

    def one(tokens):
        opt.zero_grad(set_to_none=True)
        # bfloat16: autocast's mixed precision (float32 master weights), like jaxarith's compute
        # dtype; float32: no autocast
        ctx = (torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
               if compute == "bfloat16"
               else contextlib.nullcontext())
        with ctx:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for i in range(warmup):
        one(data[i])
    t = time.perf_counter()
    for i in range(warmup, warmup + steps):
        one(data[i])
    dt = time.perf_counter() - t
    return {"tokens_per_s": steps * batch * seq_len / dt, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few steps (< 1 min)")
    p.add_argument("--sizes", default=None, help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default="bench_results/train.json")
    p.add_argument("--bf16", action="store_true",
                   help="also time bfloat16 compute (jaxarith compute dtype, torch autocast; "
                        "float32 master weights on both sides)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="trace one extra jax step per size with jax.profiler and print the XLA "
                        "ops by total time (traces under DIR/SIZE)")
    args = p.parse_args(argv)
    sizes = args.sizes.split(",") if args.sizes else (["tiny"] if args.quick else
                                                      ["tiny", "small-14M", "base-100M"])
    steps = args.steps or (5 if args.quick else 8)
    warmup = 2

    import benchenv  # scripts/ is on sys.path when this file runs

    from jaxarith.models.config import config_from_hf
    from train.metrics import flops_per_token, matmul_params

    machine = benchenv.start(quick=args.quick)
    # MFU against the best float32 matmul rate either framework reached on this CPU in this run
    peak = 1e9 * max(machine.get("jax_matmul_peak_gflops", 0.0),
                     machine.get("torch_matmul_peak_gflops", 0.0))
    rows = []
    for name in sizes:
        over, batch, seq_len = SIZES[name]
        hf = hf_config(over, seq_len)
        cfg = config_from_hf(hf.to_dict())
        fpt = flops_per_token(cfg, seq_len)
        for compute in ("float32", "bfloat16") if args.bf16 else ("float32",):
            j = bench_jax(hf, batch, seq_len, steps, warmup,
                          os.path.join(args.profile, name) if args.profile else None, compute)
            t = bench_torch(hf, batch, seq_len, steps, warmup, compute)
            rows.append({
                "size": name, "compute": compute, "params": matmul_params(cfg), "batch": batch,
                "seq_len": seq_len, "steps": steps, "flops_per_token": fpt,
                "jax_tokens_per_s": j["tokens_per_s"], "torch_tokens_per_s": t["tokens_per_s"],
                "speedup": j["tokens_per_s"] / t["tokens_per_s"],
                "jax_mfu": j["tokens_per_s"] * fpt / peak,
                "torch_mfu": t["tokens_per_s"] * fpt / peak,
                "jax_compile_s": j["compile_s"], "xla_flops_per_step": j["xla_flops_per_step"],
                "formula_flops_per_step": fpt * batch * seq_len, "jax_memory": j["memory"],
                "torch_threads": t["threads"],
            })
    machine = benchenv.finish(machine)
    print(benchenv.describe(machine))
    print(f"MFU denominator: {peak / 1e9:.1f} GFLOP/s (best float32 matmul measured above)")
    head = (f"{'size':<10} {'compute':<8} {'matmul params':>13} {'batch x seq':>11} "
            f"{'jax tok/s':>10} "
            f"{'torch tok/s':>11} {'jax/torch':>9} {'jax MFU':>8} {'torch MFU':>9} "
            f"{'compile s':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['size']:<10} {r['compute']:<8} {r['params'] / 1e6:>12.1f}M "
              f"{r['batch']:>4} x {r['seq_len']:<4} "
              f"{r['jax_tokens_per_s']:>10.0f} {r['torch_tokens_per_s']:>11.0f} "
              f"{r['speedup']:>8.2f}x {r['jax_mfu']:>8.1%} {r['torch_mfu']:>9.1%} "
              f"{r['jax_compile_s']:>9.1f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "peak_flops": peak, "quick": args.quick, "rows": rows}, f,
                  indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
