"""Benchmark: decoding tokens/s of jaxarith vs transformers, proxy tuning, speculative EFT.

Same random-weight Llama models for both sides (made locally), float32, on this CPU:

1. single model, batch 1 and 8, ``--new`` tokens: jaxarith ``generate`` vs transformers
   ``generate(do_sample=False)``; also as a fraction of the memory-bandwidth limit
   (``--bandwidth`` GB/s divided by the weight bytes: each token reads every weight once);
2. proxy tuning with three models: jaxarith's one compiled loop vs the reference method (step
   three transformers models with their KV caches and combine log-probs in Python per token);
3. speculative EFT vs plain EFT (large base + beta * (small tuned - small base)), greedy, with a
   drafter made to agree with the large model (it shares its embeddings and first layers, and
   the large model's deeper layers are damped; see ``make_agreeing``): acceptance rate, speedup;
4. streaming vs not: ``generate`` with the CLI's text streamer (``jaxarith generate`` without
   ``--json``; text written to a buffer instead of the terminal) vs without a callback (what
   ``--json`` runs), interleaved; the ratio should be close to 1.

Compile time is excluded (one warm-up call); each number is the median of ``--repeats`` runs.

    python scripts/bench_decode.py            # ~16M and ~110M Llamas, 128 tokens (minutes)
    python scripts/bench_decode.py --quick    # tiny, < 1 min
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import tempfile
import time

import benchenv  # scripts/ is on sys.path when this file runs
import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxarith import testing
from jaxarith.commands.generate import _Streamer
from jaxarith.data.assets import bundled_tokenizer
from jaxarith.decode.combine import eft, proxy_tuning
from jaxarith.decode.loop import DecodeSpec, Member, generate
from jaxarith.decode.speculative import SpeculativeSpec, generate_speculative
from jaxarith.io.convert import load_hf_params

SIZES = {  # name: hidden, intermediate, layers, heads, kv heads, vocab
    "16M": (256, 768, 4, 8, 4, 32000),
    "110M": (768, 1536, 12, 12, 4, 32000),
}
QUICK = {"tiny": (64, 128, 2, 4, 2, 1024)}


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def streaming_vs_json(dec, params, prompt, repeats):
    """(streamed tok/s, plain tok/s, median ratio): best of ``repeats`` interleaved runs each
    (the order alternates; compilation excluded). Best-of, because on a shared machine the
    noise only ever adds time; the ratio of medians is returned beside it."""
    tok = bundled_tokenizer()
    fits = dec.vocab_size <= len(tok)
    times = {"stream": [], "json": []}
    for r in range(repeats + 1):  # round 0 compiles
        for mode in ("stream", "json") if r % 2 else ("json", "stream"):
            with contextlib.redirect_stdout(io.StringIO()):
                cb = None if mode == "json" else \
                    _Streamer(tok, "") if fits else (lambda s, t, v: t.tolist())
                g = generate(dec, [params], [prompt], on_tokens=cb)
            if r:
                times[mode].append(g.seconds)
    new = dec.max_new_tokens
    median = float(np.median(times["json"]) / np.median(times["stream"]))
    return new / min(times["stream"]), new / min(times["json"]), median


def make(directory, dims, seed=0, layers=None):
    d, f, n_layers, h, kv, v = dims
    cfg = testing.tiny_llama_config(hidden_size=d, intermediate_size=f,
                                    num_hidden_layers=layers or n_layers, num_attention_heads=h,
                                    num_key_value_heads=kv, head_dim=d // h, vocab_size=v,
                                    max_position_embeddings=1024)
    model = testing.make_hf_model(directory, cfg, seed=seed, with_tokenizer=False)
    return model, *load_hf_params(directory, progress=False)


def make_agreeing(cfg, params, keep: int | None = None, damp: float = 0.05):
    """(large cfg, large params, small cfg, small tuned, small base) for speculative EFT.

    The small models share the large model's embeddings, unembedding and first ``keep`` layers;
    the large model's deeper layers have their output projections (attention ``o``, MLP
    ``down``) scaled by ``damp``, so its next-token distribution stays close to the small
    model's: a stand-in for a drafter distilled from the large model. The small base differs
    from the small tuned model by a 0.9 scale on the final norm (a different "reward").
    """
    n = cfg.num_hidden_layers
    keep = keep or max(1, n // 6)
    scale = jnp.where(jnp.arange(n) < keep, 1.0, damp)
    large = jax.tree.map(lambda x: x, params)
    layers = dict(large["layers"])
    layers["attn"] = dict(layers["attn"], o=layers["attn"]["o"] * scale[:, None, None, None])
    layers["mlp"] = dict(layers["mlp"], down=layers["mlp"]["down"] * scale[:, None, None])
    large["layers"] = layers
    tuned = dict(large, layers=jax.tree.map(lambda x: x[:keep], params["layers"]))
    base = dict(tuned, final_norm={"scale": tuned["final_norm"]["scale"] * 0.9})
    return cfg, large, dataclasses.replace(cfg, num_hidden_layers=keep), tuned, base


def hf_proxy_tuned(models, alpha, prompt, new):
    """Reference: three transformers models stepped with caches, combined in Python."""
    ids = torch.tensor([prompt])
    outs = [m(input_ids=ids, use_cache=True) for m in models]
    caches = [o.past_key_values for o in outs]
    logits = [o.logits[:, -1] for o in outs]
    tokens = []
    for _ in range(new):
        lp = [torch.log_softmax(z.float(), -1) for z in logits]
        s = lp[0] + alpha * (lp[1] - lp[2])
        tok = int(torch.argmax(s, -1))
        tokens.append(tok)
        step = torch.tensor([[tok]])
        outs = [m(input_ids=step, past_key_values=c, use_cache=True)
                for m, c in zip(models, caches, strict=True)]
        caches = [o.past_key_values for o in outs]
        logits = [o.logits[:, -1] for o in outs]
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (--quick: 2)")
    ap.add_argument("--bandwidth", type=float, default=0.0,
                    help="GB/s for the bandwidth limit (default: copy bandwidth measured now)")
    ap.add_argument("--out", default="bench_results/decode.json")
    ap.add_argument("--no-streaming", action="store_true",
                    help="skip the streamed-vs---json rows (the slowest part of a full run)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    machine = benchenv.start(quick=args.quick)
    args.bandwidth = args.bandwidth or machine["copy_gb_s"]
    sizes = QUICK if args.quick else SIZES
    args.repeats = args.repeats or (2 if args.quick else 3)
    new = 64 if args.quick else args.new
    rows = []
    prompt = list(range(3, 19))
    with tempfile.TemporaryDirectory() as work, torch.no_grad():
        for name, dims in sizes.items():
            hf, cfg, params = make(os.path.join(work, name), dims)
            weight_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
            limit = args.bandwidth * 1e9 / weight_bytes
            for batch in (1, 8):
                prompts = [prompt] * batch
                dec = DecodeSpec(members=(Member(cfg),), max_new_tokens=new)
                t_j = median_time(lambda: generate(dec, [params], prompts), args.repeats)
                ids = torch.tensor(prompts)
                t_h = median_time(lambda: hf.generate(input_ids=ids, max_new_tokens=new,
                                                      min_new_tokens=new, do_sample=False,
                                                      pad_token_id=0), args.repeats)
                rows.append({"bench": "generate", "model": name, "batch": batch,
                             "jaxarith_tok_s": batch * new / t_j,
                             "transformers_tok_s": batch * new / t_h, "speedup": t_h / t_j,
                             "bandwidth_limit_tok_s": limit * batch,
                             "fraction_of_limit": (new / t_j) / limit})
            for n_stream in () if args.no_streaming else (new, 4 * new):
                # a fixed cost per call weighs less on longer runs
                dec = DecodeSpec(members=(Member(cfg),), max_new_tokens=n_stream)
                s_stream, s_json, median = streaming_vs_json(dec, params, prompt,
                                                             max(args.repeats, 5) * 4)
                rows.append({"bench": f"streaming_{n_stream}", "model": name, "batch": 1,
                             "jaxarith_tok_s": s_stream, "reference_tok_s": s_json,
                             "speedup": s_stream / s_json, "median_ratio": median,
                             "load_average": os.getloadavg()[0]})
            # proxy tuning: base = this model, expert / anti-expert = two other seeds
            hf_e, _, pe = make(os.path.join(work, name + "e"), dims, seed=1)
            hf_a, _, pa = make(os.path.join(work, name + "a"), dims, seed=2)
            dec = DecodeSpec(members=proxy_tuning(cfg, cfg, cfg, 1.0), max_new_tokens=new)
            t_j = median_time(lambda: generate(dec, [params, pe, pa], [prompt]), args.repeats)
            t_h = median_time(lambda: hf_proxy_tuned([hf, hf_e, hf_a], 1.0, prompt, new),
                              args.repeats)
            ours = generate(dec, [params, pe, pa], [prompt]).tokens[0].tolist()
            same = ours == hf_proxy_tuned([hf, hf_e, hf_a], 1.0, prompt, new)
            rows.append({"bench": "proxy_tuning", "model": name, "batch": 1,
                         "jaxarith_tok_s": new / t_j, "reference_tok_s": new / t_h,
                         "speedup": t_h / t_j, "same_tokens": same,
                         "fraction_of_limit": (new / t_j) / (limit / 3)})
            # speculative EFT: the drafter is the large model's first layers, and the large
            # model's deeper layers are damped, so the two agree often (see make_agreeing)
            cfg_l, large, cfg_s, tuned, base = make_agreeing(cfg, params)
            dec = DecodeSpec(members=eft(cfg_l, cfg_s, cfg_s, beta=1.0), max_new_tokens=new)
            plist = [large, tuned, base]
            t_plain = median_time(lambda: generate(dec, plist, [prompt]), args.repeats)
            plain = generate(dec, plist, [prompt]).tokens
            eft_bytes = sum(x.size * 4 for p in plist for x in jax.tree.leaves(p))
            for k in (4,) if args.quick else (2, 4):
                sd = SpeculativeSpec(decoder=dec, drafter=1, k=k)
                t_spec = median_time(lambda sd=sd: generate_speculative(sd, plist, [prompt]),
                                     args.repeats)
                g = generate_speculative(sd, plist, [prompt])
                rows.append({"bench": f"speculative_eft_k{k}", "model": name, "batch": 1,
                             "plain_tok_s": new / t_plain, "speculative_tok_s": new / t_spec,
                             "speedup": t_plain / t_spec, "acceptance": g.acceptance_rate,
                             "same_tokens": bool((g.tokens == plain).all()),
                             "plain_fraction_of_limit": (new / t_plain) * eft_bytes
                             / (args.bandwidth * 1e9)})
    machine = benchenv.finish(machine)
    print(benchenv.describe(machine))
    print(f"{'bench':<20} {'model':>6} {'batch':>5} {'ours tok/s':>10} {'ref tok/s':>10} "
          f"{'speedup':>8}  notes")
    for r in rows:
        ours = r.get("jaxarith_tok_s", r.get("speculative_tok_s"))
        ref = r.get("transformers_tok_s", r.get("reference_tok_s", r.get("plain_tok_s")))
        notes = ""
        if "fraction_of_limit" in r:
            notes = f"{r['fraction_of_limit']:.0%} of bandwidth limit"
        if r["bench"].startswith("streaming"):
            notes = (f"streamed vs not (--json), best of N; median ratio "
                     f"{r['median_ratio']:.2f}; load {r['load_average']:.1f}")
        if "acceptance" in r:
            notes = f"acceptance {r['acceptance']:.2f}"
        if "same_tokens" in r:
            notes += f" same tokens: {r['same_tokens']}"
        print(f"{r['bench']:<20} {r['model']:>6} {r['batch']:>5} {ours:10.1f} {ref:10.1f} "
              f"{r['speedup']:8.2f}  {notes}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "new_tokens": new, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
