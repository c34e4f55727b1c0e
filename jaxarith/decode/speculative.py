"""Speculative decoding of a logit-arithmetic combination (speculative EFT).

One member (the small tuned model in EFT up-scaling) drafts ``J`` tokens from its own
distribution ``q``; every other member scores the pending token and the drafts in one forward of
``J + 1`` tokens; draft ``j`` is accepted with probability ``min(1, p(x) / q(x))`` and the first
rejected one is resampled from ``normalise(max(0, p - q))``, where ``p`` is the combined
distribution after temperature / top-k / top-p. The output has the distribution of plain
(non-speculative) decoding with the same :class:`~jaxarith.decode.loop.DecodeSpec`.

Shapes (letters as in :mod:`jaxarith.models`): B batch, J draft length (``SpeculativeSpec.k``),
V vocabulary, R new tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxarith.decode.loop import (
    DecodeSpec,
    Generation,
    TokenCallback,
    combine,
    compile_and_run,
    feed,
    finish,
    member_weights,
    place_prompts,
    prefill,
    prepare_prompts,
    row_limits,
    stream_chunks,
    while_in_place,
)
from jaxarith.decode.sampling import Greedy
from jaxarith.errors import ConfigError
from jaxarith.models.transformer import num_params, unstack_layers


def accept_or_resample(p: jax.Array, q: jax.Array, draft: jax.Array, key: jax.Array,
                       greedy: bool) -> tuple[jax.Array, jax.Array]:
    """The verification step of speculative sampling, for any leading shape.

    Args:
      p, q: target and draft log-probabilities [..., V]; draft: drafted tokens [...] (from q).
      key: PRNG key; greedy: accept exactly when the draft is the argmax of p.
    Returns:
      (accepted [...] bool, replacement [...] int32): where rejected, the token to emit instead,
      drawn from normalise(max(0, p - q)) (greedy: argmax p). Emitting the draft when accepted
      and the replacement otherwise gives a sample of p.
    """
    if greedy:
        best = jnp.argmax(p, axis=-1).astype(jnp.int32)
        return draft == best, best
    ku, kr = jax.random.split(key)
    lp = jnp.take_along_axis(p, draft[..., None], -1)[..., 0]
    lq = jnp.take_along_axis(q, draft[..., None], -1)[..., 0]
    accepted = jnp.log(jax.random.uniform(ku, lp.shape)) < lp - lq
    residual = jnp.maximum(jnp.exp(p) - jnp.exp(q), 0.0)
    # p == q leaves no residual mass (and then nothing is ever rejected): fall back to p
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, jnp.exp(p))
    replacement = jax.random.categorical(kr, jnp.log(residual), axis=-1).astype(jnp.int32)
    return accepted, replacement


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpeculativeSpec:
    """Speculative decoding of a combination, drafted by one of its members.

    Rows of a batch advance together: each round emits ``n + 1`` tokens per row, where ``n`` is
    the smallest number of leading drafts accepted by any unfinished row (a row that accepted
    its draft at position ``n`` emits it: that token already is a sample of the target).

    Attributes:
      decoder: the combination (and sampler, lengths) to sample from.
      drafter: index into ``decoder.members`` of the drafting model (EFT: the small tuned one).
      k: tokens drafted per round (J).
    """

    decoder: DecodeSpec
    drafter: int = 1
    k: int = 4

    def __post_init__(self):
        if not 0 <= self.drafter < len(self.decoder.members):
            raise ConfigError(f"drafter index {self.drafter} out of range for "
                              f"{len(self.decoder.members)} models")
        if self.k < 1:
            raise ConfigError(f"speculative k={self.k} must be >= 1")




def eft_drafter(configs) -> int:
    """The drafting member of an EFT combination ``(model, tuned, ref)``: the small model, i.e.
    the tuned one (1) when up-scaling (it is no larger than MODEL), MODEL (0) when
    down-scaling."""
    return 1 if num_params(configs[1]) <= num_params(configs[0]) else 0


def _rollback(cache, index):
    """Forget every slot at or after ``index`` (drafts that were not accepted)."""
    valid = cache.valid & (jnp.arange(cache.valid.shape[1])[None, :] < index)
    return cache._replace(valid=valid, index=index)


def _pick(greedy: bool, logp, key):
    """A token per row from ``logp`` (already transformed by the sampler)."""
    if greedy:
        return jnp.argmax(logp, -1).astype(jnp.int32)
    return jax.random.categorical(key, logp, -1).astype(jnp.int32)


def _speculative_start(sd: SpeculativeSpec, params, weights, prompts, key, limits):
    """The loop state after the prefill: ``(pos, out, out_lp, done, caches, t, rounds,
    accepted, drafted, key)``; the first token comes from the prefill logits, and afterwards every
    round starts with one emitted but not yet fed ("pending") token t."""
    dec, k = sd.decoder, sd.k
    b, n_new = prompts[0][0].shape[0], dec.max_new_tokens
    stops = jnp.asarray(dec.stop_tokens or (-1,), jnp.int32)
    caches, last = prefill(dec, params, prompts, extra=k + 1)
    key0, key = jax.random.split(key)
    comb0 = combine(dec, last, weights)
    t0 = dec.sampler.get_next_tokens(comb0, key0)
    out = jnp.full((b, n_new + k + 1), dec.pad_token, jnp.int32).at[:, 0].set(t0)
    out_lp = jnp.zeros((b, n_new + k + 1), jnp.float32).at[:, 0].set(
        jnp.take_along_axis(comb0, t0[:, None], -1)[:, 0])
    done = (limits <= 1) | jnp.isin(t0, stops)
    zero = jnp.zeros((), jnp.int32)
    return jnp.ones((), jnp.int32), out, out_lp, done, caches, t0, zero, zero, zero, key


def _speculative_until(sd: SpeculativeSpec, params, weights, limits, state, until):
    """Draft-and-verify rounds until ``until`` positions are filled (or every row stopped)."""
    dec, k, di = sd.decoder, sd.k, sd.drafter
    members, sampler = dec.members, dec.sampler
    greedy = isinstance(sampler, Greedy)
    drafter_only = dataclasses.replace(dec, members=(members[di],))
    one = jnp.ones((1,), jnp.float32)
    stops = jnp.asarray(dec.stop_tokens or (-1,), jnp.int32)
    slots = jnp.arange(k + 1)[None, :]
    params = tuple(unstack_layers(p) for p in params)  # read in place by the loop

    def body(s):
        pos, out, out_lp, done, caches, t, rounds, accepted, drafted, key = s
        kd, kv, kb = jax.random.split(jax.random.fold_in(key, rounds), 3)

        # 1. the drafter feeds t and proposes d_1..d_k (k + 1 forwards; the last scores d_k)
        def draft(carry, j):
            cache, tok = carry
            cache, z = feed(members[di], dec.dtype, params[di], cache, tok[:, None])
            q = sampler.transform(combine(drafter_only, [z[:, -1, :dec.vocab_size]], one))
            nxt = _pick(greedy, q, jax.random.fold_in(kd, j))
            return (cache, nxt), (z[:, -1], q, nxt)

        (d_cache, _), (zs, qs, ds) = jax.lax.scan(draft, (caches[di], t), jnp.arange(k + 1))
        drafts = ds[:k].T  # [B, J]
        chunk = jnp.concatenate([t[:, None], drafts], 1)  # [B, J + 1]
        # 2. every other member scores t, d_1..d_k in one forward
        new_caches, logits = [], []
        for i, m in enumerate(members):
            if i == di:
                new_caches.append(d_cache)
                logits.append(jnp.swapaxes(zs, 0, 1))
            else:
                c, z = feed(m, dec.dtype, params[i], caches[i], chunk)
                new_caches.append(c)
                logits.append(z)
        comb = combine(dec, logits, weights)  # [B, J + 1, V]: p(. | ..., t, d_1..d_j)
        p = sampler.transform(comb)
        # 3. accept leading drafts; the first rejected one is resampled from max(0, p - q)
        acc, repl = accept_or_resample(p[:, :k], jnp.swapaxes(qs[:k], 0, 1), drafts, kv, greedy)
        n_row = jnp.sum(jnp.cumprod(acc.astype(jnp.int32), axis=1), axis=1)  # [B]
        n = jnp.min(jnp.where(done, k, n_row))
        bonus = _pick(greedy, p[:, k], kb)
        d_ext = jnp.concatenate([drafts, bonus[:, None]], 1)  # [B, J + 1]
        r_ext = jnp.concatenate([repl, bonus[:, None]], 1)
        t_new = jnp.where(n_row > n, d_ext[:, n], r_ext[:, n])
        row = jnp.where(slots < n, d_ext, jnp.where(slots == n, t_new[:, None], dec.pad_token))
        # a row emits slots <= n, within its budget, up to and including its first stop token
        is_stop = jnp.isin(row, stops) & (slots <= n)
        after_stop = jnp.cumsum(is_stop, axis=1) - is_stop > 0
        emitted = (slots <= n) & ~done[:, None] & (pos + slots < limits[:, None]) & ~after_stop
        row = jnp.where(emitted, row, dec.pad_token)
        row_lp = jnp.take_along_axis(comb, row[..., None], -1)[..., 0]
        row_lp = jnp.where(emitted, row_lp, 0.0)
        out = jax.lax.dynamic_update_slice(out, row, (0, pos))
        out_lp = jax.lax.dynamic_update_slice(out_lp, row_lp, (0, pos))
        active = ~done
        done = done | jnp.any(is_stop & emitted, axis=1) | (pos + n + 1 >= limits)
        # 4. keep t and the n accepted drafts in every cache; t_new is the next pending token
        caches = tuple(_rollback(c, c.index - k + n) for c in new_caches)
        return (pos + n + 1, out, out_lp, done, caches, t_new, rounds + 1,
                accepted + jnp.sum(jnp.where(active, n_row, 0)),
                drafted + k * jnp.sum(active), key)

    def cond(s):
        pos, _, _, done, *_ = s
        return (pos < until) & ~jnp.all(done)

    return while_in_place(cond, body, state)


@functools.partial(jax.jit, static_argnums=0)
def _speculative(sd: SpeculativeSpec, params, weights, prompts, key, limits):
    n_new = sd.decoder.max_new_tokens
    state = _speculative_start(sd, params, weights, prompts, key, limits)
    state = _speculative_until(sd, params, weights, limits, state, n_new)
    return _outputs(n_new, state)


def _outputs(n_new: int, state):
    pos, out, out_lp, _, _, _, rounds, accepted, drafted, _ = state
    return out[:, :n_new], out_lp[:, :n_new], jnp.minimum(pos, n_new), rounds, accepted, drafted


_speculative_start_jit = jax.jit(_speculative_start, static_argnums=0)
_speculative_chunk = jax.jit(_speculative_until, static_argnums=0, donate_argnums=4)


@dataclasses.dataclass(frozen=True)
class SpeculativeGeneration(Generation):
    """A :class:`~jaxarith.decode.loop.Generation` with the drafting statistics.

    Attributes:
      acceptance_rate: accepted drafts / drafted tokens (over unfinished rows).
      rounds: draft-and-verify rounds run (``steps`` is the same number).
    """

    acceptance_rate: float = 0.0
    rounds: int = 0


def generate_speculative(
    sd: SpeculativeSpec,
    params,
    prompts,
    *,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    max_new_tokens=None,
    on_tokens: TokenCallback | None = None,
) -> SpeculativeGeneration:
    """Like :func:`jaxarith.decode.loop.generate`, drafting with ``sd.drafter``; same distribution.

    Args:
      as :func:`jaxarith.decode.loop.generate` (``on_tokens`` receives the emitted tokens in
      chunks).
    Returns:
      a :class:`SpeculativeGeneration` with the acceptance rate.
    """
    dec = sd.decoder
    if len(params) != len(dec.members):
        raise ConfigError(f"{len(params)} parameter trees for {len(dec.members)} models")
    padded = prepare_prompts(dec, prompts, extra=sd.k + 1)
    limits = row_limits(dec, padded[0][0].shape[0], max_new_tokens)
    dynamic = (tuple(params), member_weights(dec), place_prompts(padded, mesh),
               jax.random.key(seed), limits)
    if on_tokens is None:
        (out, lps, pos, rounds, accepted, drafted), seconds, compile_s = compile_and_run(
            _speculative, (sd, *dynamic), dynamic, mesh)
    else:
        params_, weights, prompts_, key, limits_ = dynamic
        state, seconds, compile_s = stream_chunks(
            dec, _speculative_start_jit, (sd, params_, weights, prompts_, key, limits_),
            _speculative_chunk, (sd, params_, weights, limits_), limits, on_tokens, mesh)
        out, lps, pos, rounds, accepted, drafted = _outputs(dec.max_new_tokens, state)
    tokens, lengths, lps = finish(dec, out, lps, limits, int(pos))
    rate = float(accepted) / max(int(drafted), 1)
    return SpeculativeGeneration(tokens, lengths, lps, int(rounds), seconds, compile_s,
                                 acceptance_rate=rate, rounds=int(rounds))
