"""Benchmark: Mixtral forward and train tokens/s, jaxarith vs transformers, same weights, float32.

For each Mixtral made locally (random weights, saved by transformers, loaded by jaxarith):

- ``forward``: jaxarith's jitted mean next-token NLL vs ``MixtralForCausalLM(input_ids,
  labels=input_ids).loss`` under ``torch.no_grad()``;
- ``train``: one optimizer step (loss with the load-balancing term, backward, AdamW): jaxarith's
  jitted ``value_and_grad`` of :func:`train.losses.moe_loss_fn` + ``optax.adamw`` vs torch's
  ``loss.backward()`` + ``torch.optim.AdamW`` with ``output_router_logits=True``;
- ``routing share``: the jitted routing alone (router logits, top-k, sort by expert, gather,
  un-sort, combine; the expert matmuls replaced by the identity) over all layers at the model's
  shapes, as a fraction of the jitted forward's time: what the sort-based dispatch costs.

Calls alternate jax / torch inside each repeat (the machine is shared); medians are reported,
with the machine facts and load of ``scripts/benchenv.py``.

    python scripts/bench_moe.py --quick      # tiny Mixtral, well under a minute
    python scripts/bench_moe.py              # + a ~100M-active Mixtral (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count"))

import benchenv  # noqa: E402  (scripts/ is on sys.path when this file runs)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SIZES = {  # name: (hidden, intermediate, layers, heads, kv_heads, vocab, experts, top_k)
    "tiny": (64, 128, 2, 4, 2, 1024, 4, 2),
    "100M-active": (768, 2048, 8, 12, 4, 32000, 8, 2),
}


def hf_config(dims, seq_len: int):
    from jaxarith.testing import tiny_mixtral_config

    d, f, n_layers, heads, kv, vocab, experts, k = dims
    return tiny_mixtral_config(vocab_size=vocab, hidden_size=d, intermediate_size=f,
                               num_hidden_layers=n_layers, num_attention_heads=heads,
                               num_key_value_heads=kv, head_dim=d // heads,
                               num_local_experts=experts, num_experts_per_tok=k,
                               max_position_embeddings=max(seq_len, 128))


def routing_only(cfg, n: int):
    """The dispatch of one layer without the expert matmuls (see the module docstring)."""
    from jaxarith.models import moe

    def one(h, router):
        logits = moe.router_logits(h, router)
        weights, experts = moe.route(logits, cfg.num_experts_per_tok)
        k = experts.shape[-1]
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        xs = jnp.take(h, order // k, axis=0)
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
        y = jnp.take(xs, inverse, axis=0).reshape(n, k, -1)
        return jnp.einsum("TCD,TC->TD", y, weights)

    @jax.jit
    def all_layers(h, routers):
        return jax.lax.scan(lambda x, r: (one(x, r), None), h, routers)[0]

    return all_layers


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_one(name, dims, args, workdir) -> dict:
    import optax
    import torch

    from jaxarith.io.convert.hf import load_hf_params
    from jaxarith.models.transformer import next_token_loss, num_params
    from jaxarith.testing import make_hf_model
    from train import losses

    directory = os.path.join(workdir, name)
    model = make_hf_model(directory, hf_config(dims, args.seq), seed=0, with_tokenizer=False)
    cfg, params = load_hf_params(directory, dtype=jnp.float32, progress=False)
    rng = np.random.default_rng(0)
    tokens_np = rng.integers(3, cfg.vocab_size, (args.batch, args.seq))
    tok_pt, tok_jx = torch.from_numpy(tokens_np), jnp.asarray(tokens_np, jnp.int32)

    fwd = jax.jit(lambda p, t: (lambda s: s[0] / s[1])(next_token_loss(p, cfg, t)))
    loss_fn = losses.moe_loss_fn(cfg)
    tx = optax.adamw(1e-4)

    @jax.jit
    def train_step(p, opt, t):
        (loss, (n, _)), g = jax.value_and_grad(
            lambda p: (lambda r: (r[0], (r[1], r[2])))(loss_fn(p, {}, {"tokens": t})),
            has_aux=True)(p)
        updates, opt = tx.update(jax.tree.map(lambda x: x / n, g), opt, p)
        return optax.apply_updates(p, updates), opt, loss / n

    t0 = time.perf_counter()
    fwd_c = fwd.lower(params, tok_jx).compile()
    opt = tx.init(params)
    step_c = train_step.lower(params, opt, tok_jx).compile()
    compile_s = time.perf_counter() - t0
    routers = params["layers"]["moe"]["router"]
    h = jnp.asarray(rng.standard_normal((args.batch * args.seq, cfg.hidden_size)), jnp.float32)
    route_c = routing_only(cfg, args.batch * args.seq).lower(h, routers).compile()

    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def torch_fwd():
        with torch.no_grad():
            return float(model(input_ids=tok_pt, labels=tok_pt).loss)

    def torch_train():
        torch_opt.zero_grad()
        loss = model(input_ids=tok_pt, labels=tok_pt, output_router_logits=True).loss
        loss.backward()
        torch_opt.step()
        return float(loss.detach())

    state = {"p": params, "o": opt}

    def jax_train():
        state["p"], state["o"], loss = step_c(state["p"], state["o"], tok_jx)
        return float(loss)

    def jax_fwd():
        return float(fwd_c(params, tok_jx))

    loss_jax, loss_torch = jax_fwd(), torch_fwd()  # warm-up, and the same number
    jax_train(), torch_train()
    times = {k: [] for k in ("jax_fwd", "torch_fwd", "jax_train", "torch_train", "route")}
    for _ in range(args.repeats):
        times["jax_fwd"] += timed(jax_fwd, 1)
        times["torch_fwd"] += timed(torch_fwd, 1)
        times["jax_train"] += timed(jax_train, 1)
        times["torch_train"] += timed(torch_train, 1)
        times["route"] += timed(lambda: jax.block_until_ready(route_c(h, routers)), 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    ntok = args.batch * args.seq
    d, f, n_layers, _, _, _, e, k = dims
    active = num_params(cfg) - n_layers * 3 * d * f * (e - k)
    return {"model": name, "params": num_params(cfg), "active_params": active,
            "batch": args.batch, "seq_len": args.seq, "compile_s": compile_s,
            "loss_jax": loss_jax, "loss_torch": loss_torch,
            "fwd_tok_s": {"jax": ntok / med["jax_fwd"], "torch": ntok / med["torch_fwd"]},
            "train_tok_s": {"jax": ntok / med["jax_train"], "torch": ntok / med["torch_train"]},
            "routing_share_of_forward": med["route"] / med["jax_fwd"], "median_s": med}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny model only, few repeats")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default="bench_results/moe.json")
    args = ap.parse_args(argv)
    args.batch = args.batch or 4
    args.seq = args.seq or (128 if args.quick else 512)
    args.repeats = args.repeats or (3 if args.quick else 5)
    sizes = {"tiny": SIZES["tiny"]} if args.quick else SIZES
    env = benchenv.start(quick=args.quick)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, dims in sizes.items():
            rows.append(bench_one(name, dims, args, workdir))
    env = benchenv.finish(env)
    print(benchenv.describe(env))
    print(f"{'model':>12} {'params':>11} {'active':>11}  fwd tok/s jax / torch   "
          f"train tok/s jax / torch   routing share  |loss diff|")
    for r in rows:
        print(f"{r['model']:>12} {r['params']:>11,} {r['active_params']:>11,}  "
              f"{r['fwd_tok_s']['jax']:>9.0f} / {r['fwd_tok_s']['torch']:<9.0f}  "
              f"{r['train_tok_s']['jax']:>9.0f} / {r['train_tok_s']['torch']:<9.0f}  "
              f"{r['routing_share_of_forward']:>12.1%}  {abs(r['loss_jax'] - r['loss_torch']):.1e}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": env, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
