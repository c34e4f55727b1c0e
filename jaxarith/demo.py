"""The embedded default job: a tiny Llama sharded over the CPU devices, scored on bundled text.

    python -m jaxarith.demo [--mesh data=2,fsdp=2,tensor=2] [--json]

Builds a tiny Llama with random weights (the bundled 1024-token tokenizer's vocabulary), places it
on a ``data x fsdp x tensor`` mesh, prints where its tensors live, its loss on bundled held-out
text, and a short greedy continuation. ``make demo`` runs it on 8 fake CPU devices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--help" not in sys.argv and "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxarith import assets, sharding  # noqa: E402
from jaxarith.evaluate import eval_loss  # noqa: E402
from jaxarith.models import LlamaConfig, init_params, jit_forward, num_params  # noqa: E402

TINY = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   max_position_embeddings=256, bos_token_id=assets.BOS_ID,
                   eos_token_id=assets.EOS_ID, pad_token_id=assets.PAD_ID)


def greedy(params, cfg, mesh, ids: list[int], n: int) -> list[int]:
    """Greedy continuation by re-running the jitted forward on a fixed-length window."""
    window = cfg.context_length
    out = list(ids)
    with jax.set_mesh(mesh):
        shd = sharding.named_sharding(mesh, ("batch", "seq"), (1, window))
        for _ in range(n):
            ctx = out[-window:]
            tokens = np.zeros((1, window), np.int32)
            mask = np.zeros((1, window), np.int32)
            tokens[0, window - len(ctx):] = ctx  # left padding keeps the last position fixed
            mask[0, window - len(ctx):] = 1
            logits = jit_forward(params, cfg, jax.device_put(tokens, shd),
                                 jax.device_put(mask, shd))
            out.append(int(jnp.argmax(logits[0, -1])))
    return out[len(ids):]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mesh", default="data=2,fsdp=2,tensor=2")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    mesh = sharding.make_mesh(args.mesh)
    cfg = TINY
    params = init_params(cfg, jax.random.key(0), mesh=mesh)
    tok = assets.bundled_tokenizer()
    text = assets.read_text(assets.CORPUS_DOCS)[-20_000:]  # held-out tail of the bundled docs
    ids = tok(text)["input_ids"]
    loss = eval_loss(params, cfg, ids, seq_len=cfg.context_length, mesh=mesh)
    prompt = "Return the number of items in a"
    cont = greedy(params, cfg, mesh, tok(prompt)["input_ids"], 12)
    q = params["layers"]["attn"]["q"]
    result = {
        "mesh": sharding.mesh_spec_string(mesh),
        "devices": jax.device_count(),
        "params": num_params(cfg),
        "q_sharding": str(q.sharding.spec),
        "loss": loss.loss,
        "ppl": loss.ppl,
        "tokens": loss.tokens,
        "prompt": prompt,
        "continuation": tok.decode(cont),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"mesh {result['mesh']} over {result['devices']} {jax.devices()[0].platform} devices")
    print(f"tiny Llama: {result['params']:,} parameters, random init")
    print(f"layers/attn/q {tuple(q.shape)} sharded as {result['q_sharding']} "
          f"({len(q.addressable_shards)} shards of {tuple(q.addressable_shards[0].data.shape)})")
    print(f"loss on {loss.tokens} bundled tokens: {loss.loss:.4f} (ppl {loss.ppl:.1f}; "
          f"uniform would be {np.log(cfg.vocab_size):.4f})")
    print(f"greedy: {prompt!r} -> {result['continuation']!r}")
    print(f"done in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
