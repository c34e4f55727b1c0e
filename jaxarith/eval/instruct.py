"""Instruction eval: answer-only NLL and exact match of greedy answers on held-out conversations.

For one model or any logit-arithmetic combination of models (the members of a
:class:`~jaxarith.decode.loop.DecodeSpec`, e.g. :func:`jaxarith.decode.combine.proxy_tuning`), on
conversations that end with an assistant turn (the bundled ``instruct_eval.jsonl`` by default):

- **answer NLL**: the mean negative log-likelihood per *assistant* token (the answer and its
  end-of-turn token, as :mod:`jaxarith.data.chat` weights them) under the combined distribution
  ``log_softmax(sum_i w_i log_softmax(z_i))`` (for one model, its own ``log_softmax(z)``),
  teacher-forced on the rendered conversation;
- **exact match**: the share of prompts whose greedy answer (the jitted decoder, stopping at the
  end-of-turn token, at most ``max_new_tokens``) equals the reference answer after stripping
  surrounding whitespace.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxarith.data import chat
from jaxarith.decode.loop import DecodeSpec, Member, combine, generate
from jaxarith.errors import JaxarithError
from jaxarith.io.vocab import combination_limit
from jaxarith.models.transformer import forward


@dataclasses.dataclass(frozen=True)
class InstructEval:
    """Attributes:
    nll: mean NLL per assistant token (nats); tokens: assistant tokens scored;
    exact_match: share of exact greedy answers; n: conversations; answers: the greedy answers.
    """

    nll: float
    tokens: int
    exact_match: float
    n: int
    answers: tuple[str, ...] = ()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.partial(jax.jit, static_argnums=0)
def _answer_nll(dec: DecodeSpec, params, member_w, tokens, mask, weights):
    logits = [forward(p, m.config, tokens, attention_mask=mask)[0]
              for m, p in zip(dec.members, params, strict=True)]
    logp = combine(dec, [z[:, :-1] for z in logits], member_w)  # [B, T-1, V]
    lp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    w = weights[:, 1:] * (mask[:, :-1] & mask[:, 1:])
    return -jnp.sum(jnp.where(w > 0, lp, 0.0) * w), jnp.sum(w)


def answer_nll(members: Sequence[Member], params: Sequence[dict],
               conversations: Sequence[Sequence[dict]], tokenizer, *,
               batch_size: int = 16) -> tuple[float, int]:
    """Mean NLL per assistant token of ``conversations`` and the number of such tokens.

    Conversations are rendered whole (every assistant turn is scored), right-padded into
    ``[batch_size, T]`` batches with ``T`` the longest rounded up to 16 (one compiled program).
    """
    sizes = {f"{i}:{m.role}": m.config.vocab_size for i, m in enumerate(members)}
    dec = DecodeSpec(members=tuple(members), max_new_tokens=1,
                     vocab_limit=combination_limit(tokenizer, sizes))
    rendered = [chat.render(c, tokenizer) for c in conversations]
    if not rendered:
        raise JaxarithError("no conversations to evaluate")
    seq = _round_up(max(len(ids) for ids, _ in rendered), 16)
    limit = min(m.config.context_length for m in members)
    if seq > limit:
        seq = max(len(ids) for ids, _ in rendered)
        if seq > limit:
            raise JaxarithError(f"a conversation of {seq} tokens exceeds the model's context "
                                f"of {limit}")
    weights_m = np.asarray([m.weight for m in members], np.float32)
    total, count = 0.0, 0.0
    for s in range(0, len(rendered), batch_size):
        chunk = rendered[s: s + batch_size]
        tokens = np.zeros((batch_size, seq), np.int32)
        mask = np.zeros((batch_size, seq), bool)
        weights = np.zeros((batch_size, seq), np.float32)
        for i, (ids, w) in enumerate(chunk):
            tokens[i, : len(ids)], mask[i, : len(ids)], weights[i, : len(ids)] = ids, True, w
        nll, n = _answer_nll(dec, tuple(params), weights_m, tokens, mask, weights)
        total, count = total + float(nll), count + float(n)
    if count == 0:
        raise JaxarithError("the conversations have no assistant tokens to score")
    return total / count, int(count)


def greedy_answers(members: Sequence[Member], params: Sequence[dict],
                   conversations: Sequence[Sequence[dict]], tokenizer, *,
                   max_new_tokens: int = 32, batch_size: int = 32, mesh=None) -> list[str]:
    """The greedy answer to each conversation's last user turn (text before end-of-turn)."""
    prompts = [chat.prompt_and_answer(c, tokenizer)[0] for c in conversations]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = chat.stop_tokens(tokenizer)
    bucket = _round_up(max(len(p) for p in prompts), 8)  # every batch: one prompt length
    dec = DecodeSpec(members=tuple(members), max_new_tokens=max_new_tokens, stop_tokens=stops,
                  pad_token=pad, prompt_bucket=bucket,
                  vocab_limit=min(len(tokenizer), *(m.config.vocab_size for m in members)))
    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s: s + batch_size]
        batch = chunk + [chunk[-1]] * (batch_size - len(chunk))  # fixed batch: one program
        gen = generate(dec, params, batch, mesh=mesh)
        for row, n in zip(gen.tokens[: len(chunk)], gen.lengths[: len(chunk)], strict=True):
            ids = [int(t) for t in row[:n] if int(t) not in stops]
            out.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return out


def evaluate_instruct(members: Sequence[Member], params: Sequence[dict],
                      conversations: Sequence[Sequence[dict]], tokenizer, *,
                      max_new_tokens: int = 32, batch_size: int = 32,
                      mesh=None) -> InstructEval:
    """Answer-only NLL and exact match (see the module docstring) of a model or combination.

    Args:
      members: the models combined (one ``Member(config)`` for a plain model; a preset of
        :mod:`jaxarith.decode.combine` for logit arithmetic).
      params: one parameter tree per member.
      conversations: each ends with the reference assistant answer.
    """
    nll, n_tok = answer_nll(members, params, conversations, tokenizer,
                            batch_size=min(batch_size, 16))
    answers = greedy_answers(members, params, conversations, tokenizer,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, mesh=mesh)
    refs = [c[-1]["content"].strip() for c in conversations]
    em = float(np.mean([a == r for a, r in zip(answers, refs, strict=True)]))
    return InstructEval(nll=nll, tokens=n_tok, exact_match=em, n=len(conversations),
                        answers=tuple(answers))
