"""``jaxarith eval-loss MODEL --text FILE``: mean per-token NLL and perplexity of a text."""

from __future__ import annotations

from jaxarith.commands import _common
from jaxarith.errors import ConfigError, JaxarithError
from jaxarith.eval.loss import eval_loss
from jaxarith.io.refs import load_model


def register(sub) -> None:
    p = sub.add_parser("eval-loss", help="per-token loss and perplexity of a text under a model",
                       description=__doc__)
    p.add_argument("model", help="HF hub id, local HF directory or Orbax checkpoint directory")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--seq-len", type=int, default=None,
                   help="window length in tokens (default: the model's context length)")
    p.add_argument("--batch-size", type=int, default=8)
    _common.add_mesh(p)
    _common.add_dtype(p)
    _common.add_json(p)
    p.set_defaults(handler=handle)


def handle(args) -> int:
    import sys

    import jax.numpy as jnp

    _common.check_positive(batch_size=args.batch_size)
    if args.seq_len is not None and args.seq_len < 2:
        raise ConfigError(f"--seq-len {args.seq_len}: must be at least 2 (one token predicts "
                          "the next)")
    text = _common.read_text(args.text)  # before loading the model: fail fast
    mesh = _common.mesh_from(args)
    model = load_model(args.model, mesh=mesh, progress=_common.progress_enabled(args))
    ctx = model.config.context_length
    if args.seq_len is not None and args.seq_len > ctx:
        print(f"jaxarith eval-loss: warning: --seq-len {args.seq_len} exceeds the model's "
              f"context length {ctx}; scoring windows of {ctx} tokens", file=sys.stderr)
    ids = model.tokenizer()(text)["input_ids"]
    if len(ids) < 2:
        raise JaxarithError(f"{args.text}: fewer than two tokens to score")
    res = eval_loss(model.params, model.config, ids, seq_len=args.seq_len,
                    batch_size=args.batch_size, mesh=mesh, dtype=jnp.dtype(args.dtype),
                    progress=_common.progress_enabled(args))
    _common.emit(args, {"loss": res.loss, "ppl": res.ppl, "tokens": res.tokens},
                 f"loss {res.loss:.6f}  ppl {res.ppl:.3f}  tokens {res.tokens}")
    return 0
