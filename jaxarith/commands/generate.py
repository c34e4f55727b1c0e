"""``jaxarith generate MODEL --prompt TEXT``: jitted KV-cache generation, alone or combined.

Logit arithmetic:
  --expert E --anti-expert A --alpha a    proxy tuning: MODEL + a * (E - A)
  --eft TUNED REF --beta b               emulated fine-tuning: MODEL + b * (TUNED - REF)
                                          (up-scaling: MODEL large base, TUNED/REF small;
                                           down-scaling: MODEL small base, TUNED/REF large)
  --speculative K                         with --eft: TUNED drafts K tokens per round
"""

from __future__ import annotations

import argparse
import time

from jaxarith.commands import _common


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text (proxy tuning, EFT, speculative EFT)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="HF hub id, local HF directory or Orbax checkpoint directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default when no "
                   "--temperature/--top-p/--top-k is given)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expert")
    p.add_argument("--anti-expert")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--eft", nargs=2, metavar=("TUNED", "REF"))
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--speculative", type=int, default=0, metavar="K")
    p.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True)
    _common.add_mesh(p)
    _common.add_dtype(p)
    _common.add_json(p)
    p.set_defaults(handler=handle)


def _sampler(args):
    from jaxarith.errors import ConfigError
    from jaxarith.sampling import Greedy, Sample

    sampling = any(v is not None for v in (args.temperature, args.top_p, args.top_k))
    if args.greedy and sampling:
        raise ConfigError("--greedy excludes --temperature/--top-p/--top-k")
    if not sampling:
        return Greedy()
    return Sample(temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p)


def handle(args) -> int:
    from jaxarith.decode import Decoder, Member, generate
    from jaxarith.errors import ConfigError
    from jaxarith.logits import SpeculativeDecoder, eft, generate_speculative, proxy_tuning
    from jaxarith.refs import load_model

    prompts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ConfigError("give at least one --prompt or a --prompt-file")
    if args.expert is not None and args.eft is not None:
        raise ConfigError("--expert/--anti-expert and --eft are exclusive")
    if (args.expert is None) != (args.anti_expert is None):
        raise ConfigError("proxy tuning needs both --expert and --anti-expert")
    if args.speculative and args.eft is None:
        raise ConfigError("--speculative drafts with the --eft tuned model: give --eft")
    mesh = _common.mesh_from(args)
    quiet = not _common.progress_enabled(args)
    refs = [args.model]
    if args.expert is not None:
        refs += [args.expert, args.anti_expert]
    elif args.eft is not None:
        refs += list(args.eft)
    models = [load_model(r, mesh=mesh, progress=not quiet) for r in refs]
    cfgs = [m.config for m in models]
    if args.expert is not None:
        members = proxy_tuning(*cfgs, alpha=args.alpha)
    elif args.eft is not None:
        members = eft(*cfgs, beta=args.beta)
    else:
        members = (Member(cfgs[0]),)
    tok = models[0].tokenizer()
    vocab = {len(m.tokenizer()) for m in models}
    if len(vocab) != 1:
        raise ConfigError(f"the models' tokenizers differ in size: {sorted(vocab)}")
    eos = cfgs[0].eos_token_id
    stops = () if not args.stop_at_eos or eos is None else \
        (tuple(eos) if isinstance(eos, tuple) else (eos,))
    pad = cfgs[0].pad_token_id if cfgs[0].pad_token_id is not None else 0
    dec = Decoder(members=members, max_new_tokens=args.max_new_tokens, sampler=_sampler(args),
                  stop_tokens=stops, pad_token=pad, vocab_limit=vocab.pop(), dtype=args.dtype)
    ids = [tok(p)["input_ids"] for p in prompts]
    params = [m.params for m in models]
    t0 = time.perf_counter()
    if args.speculative:
        sd = SpeculativeDecoder(decoder=dec, drafter=1, k=args.speculative)
        g = generate_speculative(sd, params, ids, seed=args.seed)
    else:
        g = generate(dec, params, ids, seed=args.seed, mesh=mesh)
    seconds = time.perf_counter() - t0
    results = []
    for row, n in zip(g.tokens, g.lengths, strict=True):
        token_ids = [int(t) for t in row[:n]]
        results.append({"text": tok.decode(token_ids, skip_special_tokens=True),
                        "token_ids": token_ids,
                        "tokens_per_s": float(sum(g.lengths)) / seconds})
    info = {**results[0], "results": results, "seconds": seconds}
    if args.speculative:
        info["acceptance_rate"] = getattr(g, "acceptance_rate", None)
    human = "\n".join(f"{p}{r['text']}" for p, r in zip(prompts, results, strict=True))
    human += f"\n[{sum(g.lengths)} tokens in {seconds:.2f} s incl. compilation"
    if args.speculative:
        human += f", acceptance {info['acceptance_rate']:.2f}"
    _common.emit(args, info, human + "]")
    return 0
