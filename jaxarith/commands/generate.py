"""``jaxarith generate MODEL --prompt TEXT``: jitted KV-cache generation, alone or combined.

Logit arithmetic (every model must share MODEL's tokenizer):
  --expert E --anti-expert A --alpha a    proxy tuning: MODEL + a * (E - A)
  --eft TUNED REF --beta b               emulated fine-tuning: MODEL + b * (TUNED - REF)
                                          up-scaling: MODEL = large base, TUNED/REF small;
                                          down-scaling: MODEL = small base, TUNED/REF large
  --speculative K                         with --eft: the smaller model drafts K tokens per
                                          round (TUNED when up-scaling, MODEL when down-scaling)
  --template ROLE=TEXT                    a prompt template per model ({prompt} is replaced);
                                          ROLE: model, expert, anti-expert, tuned, ref

With one prompt and no --json, text is streamed to the terminal as tokens arrive.
"""

from __future__ import annotations

import argparse
import sys

from jaxarith.commands import _common
from jaxarith.decode.combine import members_for
from jaxarith.decode.loop import DecodeSpec, generate
from jaxarith.decode.sampling import Greedy, Sampling
from jaxarith.decode.speculative import SpeculativeSpec, eft_drafter, generate_speculative
from jaxarith.distributed import is_primary
from jaxarith.errors import ConfigError
from jaxarith.io.refs import load_model
from jaxarith.io.vocab import shared_tokenizer, tokenizer_rows

ROLES = {"proxy": ("model", "expert", "anti-expert"), "eft": ("model", "tuned", "ref"),
         "single": ("model",)}


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
    _common.add_combination(p)
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="with --eft: draft K tokens per round with the smaller model")
    p.add_argument("--template", action="append", default=[], metavar="ROLE=TEXT",
                   help="prompt template for one model, e.g. 'expert=Q: {prompt}\\nA:'")
    p.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True)
    _common.add_mesh(p)
    _common.add_dtype(p)
    _common.add_json(p)
    p.set_defaults(handler=handle)


def _sampler(args):
    sampling = any(v is not None for v in (args.temperature, args.top_p, args.top_k))
    if args.greedy and sampling:
        raise ConfigError("--greedy excludes --temperature/--top-p/--top-k")
    if not sampling:
        return Greedy()
    temperature = 1.0 if args.temperature is None else args.temperature
    return Sampling(temperature=temperature, top_k=args.top_k, top_p=args.top_p)


def check_mode(args) -> str:
    """The combination the flags ask for: ``single``, ``proxy`` or ``eft`` (a bad mix raises)."""
    if args.expert is not None and args.eft is not None:
        raise ConfigError("--expert/--anti-expert and --eft are exclusive")
    if (args.expert is None) != (args.anti_expert is None):
        raise ConfigError("proxy tuning needs both --expert and --anti-expert")
    if args.speculative and args.eft is None:
        raise ConfigError("--speculative drafts with the --eft tuned model: give --eft")
    if args.speculative < 0:
        raise ConfigError(f"--speculative {args.speculative} must be >= 1")
    return "proxy" if args.expert is not None else "eft" if args.eft is not None else "single"


def _templates(args, mode: str) -> dict[str, str]:
    out = {}
    for item in args.template:
        role, sep, text = item.partition("=")
        if not sep or role not in ROLES[mode]:
            raise ConfigError(f"--template {item!r}: expected ROLE=TEXT with ROLE one of "
                              f"{', '.join(ROLES[mode])}")
        if "{prompt}" not in text:
            raise ConfigError(f"--template {item!r} has no {{prompt}} placeholder")
        out[role] = text.replace("\\n", "\n")
    return out


class _Streamer:
    """Prints row 0's text to stdout as tokens arrive (the ``on_tokens`` callback of generate:
    called once per chunk of tokens)."""

    def __init__(self, tok, prefix: str):
        self.tok, self.ids, self.shown = tok, [], ""
        print(prefix, end="", flush=True)

    def __call__(self, start, tokens, valid) -> None:
        self.ids += [int(t) for t, v in zip(tokens[0], valid[0], strict=True) if v]
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.shown):  # a partial UTF-8 sequence may still change
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


def handle(args) -> int:
    import jax.numpy as jnp

    mode = check_mode(args)
    templates = _templates(args, mode)
    prompts = list(args.prompt)
    if args.prompt_file:
        text = _common.read_text(args.prompt_file, "--prompt-file")
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("give at least one --prompt or a --prompt-file")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ConfigError(f"prompt(s) {empty} are empty: give some text to continue")
    mesh = _common.mesh_from(args)
    quiet = not _common.progress_enabled(args)
    refs = _common.combination_refs(args, mode)
    models = [load_model(r, mesh=mesh, dtype=jnp.dtype(args.dtype), progress=not quiet)
              for r in refs]
    cfgs = [m.config for m in models]
    members = members_for(mode, cfgs, alpha=args.alpha, beta=args.beta)
    tok = shared_tokenizer(refs, [m.tokenizer() for m in models])
    rows = tokenizer_rows(tok, {r: c.vocab_size for r, c in zip(refs, cfgs, strict=True)})
    eos = cfgs[0].eos_token_id
    stops = () if not args.stop_at_eos or eos is None else \
        (tuple(eos) if isinstance(eos, tuple | list) else (eos,))
    pad = cfgs[0].pad_token_id if cfgs[0].pad_token_id is not None else 0
    dec = DecodeSpec(members=members, max_new_tokens=args.max_new_tokens, sampler=_sampler(args),
                  stop_tokens=stops, pad_token=pad, vocab_limit=rows, dtype=args.dtype)
    ids = [[tok(templates.get(role, "{prompt}").replace("{prompt}", p))["input_ids"]
            for p in prompts] for role in ROLES[mode]]
    if any(len(row) == 0 for batch in ids for row in batch):
        raise ConfigError("a prompt tokenised to zero tokens (empty prompt?)")
    streamer = _Streamer(tok, prompts[0]) if len(prompts) == 1 and not args.json else None
    params = [m.params for m in models]
    if args.speculative:
        sd = SpeculativeSpec(decoder=dec, drafter=eft_drafter(cfgs), k=args.speculative)
        g = generate_speculative(sd, params, ids, seed=args.seed, mesh=mesh, on_tokens=streamer)
    else:
        g = generate(dec, params, ids, seed=args.seed, mesh=mesh, on_tokens=streamer)
    results = []
    for row, n in zip(g.tokens, g.lengths, strict=True):
        token_ids = [int(t) for t in row[:n]]
        results.append({"text": tok.decode(token_ids, skip_special_tokens=True),
                        "token_ids": token_ids, "tokens_per_s": int(n) / g.seconds})
    info = {**results[0], "results": results, "seconds": g.seconds,
            "compile_seconds": g.compile_seconds, "batch_tokens_per_s": g.tokens_per_s}
    if args.speculative:
        info["acceptance_rate"] = g.acceptance_rate
        info["drafter"] = refs[sd.drafter]
    stats = (f"[{int(sum(g.lengths))} tokens, {g.tokens_per_s:.1f} tokens/s; compilation "
             f"{g.compile_seconds:.1f} s"
             + (f"; acceptance {g.acceptance_rate:.2f}" if args.speculative else "") + "]")
    if streamer is not None:
        print()
        if is_primary():  # a multi-process run: one stats line, process 0's
            print(stats, file=sys.stderr)
        return 0
    human = "\n".join(f"{p}{r['text']}" for p, r in zip(prompts, results, strict=True))
    _common.emit(args, info, human + "\n" + stats)
    return 0
