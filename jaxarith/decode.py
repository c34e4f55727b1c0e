"""Jitted generation with a static-length KV cache, for one model or a weighted product of several.

One compiled program does everything: prefill every member model on its own (left-padded) prompt,
then a ``lax.while_loop`` that at each step combines the members' next-token log-probabilities

    log p = log_softmax( sum_i w_i * log_softmax(z_i) )          (float32)

samples from it (greedy / temperature / top-k / top-p, applied *after* combining), and feeds the
token to every member's cache. One member with weight 1 is plain generation; proxy tuning and
emulated fine-tuning are weight choices (see :mod:`jaxarith.logits`).

A :class:`Decoder` is a frozen, hashable description (configs, weights, sampler, lengths) and is
the static argument of the jitted function: calls with the same decoder and shapes do not recompile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxarith import sharding
from jaxarith.errors import ConfigError
from jaxarith.models.config import ModelConfig
from jaxarith.models.transformer import CACHE_AXES, forward, init_cache
from jaxarith.sampling import Greedy, Sampler


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of a combination: its config, its weight and a role name for reports."""

    config: ModelConfig
    weight: float = 1.0
    role: str = "model"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decoder:
    """What to generate and how (static: it keys the compilation cache).

    Attributes:
      members: the models combined at every step (their configs must share ``vocab_size``).
      sampler: applied to the combined log-probabilities.
      max_new_tokens: the loop's length (the KV caches hold prompt + this many tokens).
      stop_tokens: a row stops after emitting one of these; later positions hold ``pad_token``.
      vocab_limit: ids >= this (padded embedding rows beyond the tokenizer) get probability 0.
      dtype: compute dtype of the forward passes.
    """

    members: tuple[Member, ...]
    max_new_tokens: int
    sampler: Sampler = Greedy()
    stop_tokens: tuple[int, ...] = ()
    pad_token: int = 0
    vocab_limit: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if not self.members:
            raise ConfigError("a decoder needs at least one model")
        vocabs = {m.config.vocab_size for m in self.members}
        if len(vocabs) != 1:
            roles = ", ".join(f"{m.role}={m.config.vocab_size}" for m in self.members)
            raise ConfigError(f"models combined at decode time must share a vocabulary; "
                              f"vocab sizes differ: {roles}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 1")

    @property
    def vocab_size(self) -> int:
        return self.members[0].config.vocab_size


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: np.ndarray  # [B, max_new_tokens] (pad after a stop token)
    lengths: np.ndarray  # [B] tokens generated, including the stop token
    logprobs: np.ndarray  # [B, max_new_tokens] log p(token) under the combined distribution
    steps: int  # loop iterations run (stops early when every row has stopped)


def left_pad(prompts: Sequence[Sequence[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Batch token lists, left-padded to the longest: (tokens [B, P], mask [B, P])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt must have at least one token")
    n = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), n), pad, np.int32)
    mask = np.zeros((len(prompts), n), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, n - len(p):] = p
        mask[i, n - len(p):] = 1
    return tokens, mask


def combine(dec: Decoder, logits: Sequence[jax.Array]) -> jax.Array:
    """Combined, renormalised log-probabilities [B, V] from each member's logits [B, V]."""
    total = 0.0
    for member, z in zip(dec.members, logits, strict=True):
        z = z.astype(jnp.float32)
        if dec.vocab_limit is not None and dec.vocab_limit < z.shape[-1]:
            z = jnp.where(jnp.arange(z.shape[-1]) < dec.vocab_limit, z, -jnp.inf)
        lp = jax.nn.log_softmax(z, axis=-1)
        # keep -inf rows at -inf whatever the weight's sign (0 * -inf would be nan)
        term = jnp.where(jnp.isneginf(lp), -jnp.inf, member.weight * lp)
        total = total + term
    return jax.nn.log_softmax(total, axis=-1)


def _constrain_cache(cache):
    return jax.tree.map(sharding.constrain, cache, CACHE_AXES,
                        is_leaf=lambda x: isinstance(x, jax.Array))


def prefill(dec: Decoder, params, prompts):
    """Each member's cache after its prompt and its next-token logits [B, V]."""
    caches, last = [], []
    for member, p, (tokens, mask) in zip(dec.members, params, prompts, strict=True):
        cfg = member.config
        cache = init_cache(cfg, tokens.shape[0], tokens.shape[1] + dec.max_new_tokens,
                           jnp.dtype(dec.dtype))
        cache = _constrain_cache(cache)
        logits, cache = forward(p, cfg, tokens, attention_mask=mask, cache=cache,
                                dtype=jnp.dtype(dec.dtype))
        caches.append(cache)
        last.append(logits[:, -1])
    return tuple(caches), tuple(last)


def step(dec: Decoder, params, caches, tokens, mask):
    """Feed tokens [B, T] to every member; returns (caches, logits [B, T, V] per member)."""
    new_caches, logits = [], []
    for member, p, cache in zip(dec.members, params, caches, strict=True):
        lg, cache = forward(p, member.config, tokens, attention_mask=mask, cache=cache,
                            dtype=jnp.dtype(dec.dtype))
        new_caches.append(cache)
        logits.append(lg)
    return tuple(new_caches), tuple(logits)


@functools.partial(jax.jit, static_argnums=0)
def _generate(dec: Decoder, params, prompts, key):
    b = prompts[0][0].shape[0]
    n = dec.max_new_tokens
    caches, last = prefill(dec, params, prompts)
    stops = jnp.asarray(dec.stop_tokens or (-1,), jnp.int32)

    def cond(state):
        i, _, _, done, *_ = state
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, out, out_lp, done, caches, last, key = state
        logp = combine(dec, last)
        tok = dec.sampler.select(logp, jax.random.fold_in(key, i))
        lp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
        tok = jnp.where(done, dec.pad_token, tok)
        out = out.at[:, i].set(tok)
        out_lp = out_lp.at[:, i].set(jnp.where(done, 0.0, lp))
        caches, logits = step(dec, params, caches, tok[:, None], (~done)[:, None])
        done = done | jnp.isin(tok, stops)
        return i + 1, out, out_lp, done, caches, tuple(z[:, -1] for z in logits), key

    state = (jnp.zeros((), jnp.int32), jnp.full((b, n), dec.pad_token, jnp.int32),
             jnp.zeros((b, n), jnp.float32), jnp.zeros((b,), bool), caches, last, key)
    i, out, out_lp, done, *_ = jax.lax.while_loop(cond, body, state)
    is_stop = jnp.isin(out, stops)
    first_stop = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1) + 1, i)
    return out, jnp.minimum(first_stop, i), out_lp, i


def generate(
    dec: Decoder,
    params: Sequence[dict],
    prompts: Sequence[Sequence[Sequence[int]]] | Sequence[Sequence[int]],
    *,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> Generation:
    """Generate for a batch of prompts.

    Args:
      dec: the decoder (models' configs, weights, sampler, lengths).
      params: one parameter tree per member, in ``dec.members`` order.
      prompts: token lists, either one batch shared by all members, or one batch per member
        (each model may get its own prompt template; the batch sizes must agree).
      seed: PRNG seed (sampling only).
      mesh: run sharded on this mesh (params should already be placed on it).
    """
    if len(params) != len(dec.members):
        raise ConfigError(f"{len(params)} parameter trees for {len(dec.members)} models")
    per_member = isinstance(prompts[0][0], Sequence | np.ndarray) if len(prompts) else False
    batches = list(prompts) if per_member else [prompts] * len(dec.members)
    if len(batches) != len(dec.members):
        raise ConfigError(f"{len(batches)} prompt batches for {len(dec.members)} models")
    padded = []
    for member, batch in zip(dec.members, batches, strict=True):
        tokens, mask = left_pad(batch, dec.pad_token)
        limit = member.config.context_length
        if tokens.shape[1] + dec.max_new_tokens > limit:
            raise ConfigError(
                f"{member.role}: prompt of {tokens.shape[1]} tokens + max_new_tokens="
                f"{dec.max_new_tokens} exceeds the model's context of {limit}")
        padded.append((tokens, mask))
    if len({t.shape[0] for t, _ in padded}) != 1:
        raise ConfigError("every model needs the same number of prompts")
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        if mesh is not None:
            padded = [tuple(jax.device_put(a, sharding.named_sharding(mesh, ("batch", "seq"),
                                                                      a.shape)) for a in pm)
                      for pm in padded]
        out, lengths, lps, steps = _generate(dec, tuple(params), tuple(padded),
                                             jax.random.key(seed))
    return Generation(np.asarray(out), np.asarray(lengths), np.asarray(lps), int(steps))
