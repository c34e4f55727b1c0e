"""Logit arithmetic presets (proxy tuning, emulated fine-tuning) and speculative EFT.

All presets are weights of :func:`jaxarith.decode.combine`'s product of experts:

- proxy tuning (Liu et al. 2024): ``s = s_base + alpha * (s_expert - s_anti)``
- EFT up- or down-scaling (Mitchell et al. 2023): ``s = s_model + beta * (s_tuned - s_ref)``
  (up-scaling: model = large base, tuned / ref = small tuned / small base; down-scaling: model =
  small base, tuned / ref = large tuned / large base)
- reward interpolation: ``s = s_base + lam * (s_tuned1 - s_ref) + (1 - lam) * (s_tuned2 - s_ref)``

Speculative EFT: the small tuned model drafts ``k`` tokens, the other members score them in one
forward, each draft token is accepted with probability ``min(1, p(x) / q(x))`` and the first
rejected one is resampled from ``normalise(max(0, p - q))``; the output distribution is that of
plain EFT.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxarith.decode import Decoder, Generation, Member, combine, left_pad, prefill, step
from jaxarith.errors import ConfigError
from jaxarith.models.config import ModelConfig
from jaxarith.sampling import Greedy


def proxy_tuning(base: ModelConfig, expert: ModelConfig, anti_expert: ModelConfig,
                 alpha: float = 1.0) -> tuple[Member, ...]:
    return (Member(base, 1.0, "base"), Member(expert, alpha, "expert"),
            Member(anti_expert, -alpha, "anti_expert"))


def eft(model: ModelConfig, tuned: ModelConfig, reference: ModelConfig,
        beta: float = 1.0) -> tuple[Member, ...]:
    """Emulated fine-tuning: ``model`` + beta * (``tuned`` - ``reference``)."""
    return (Member(model, 1.0, "model"), Member(tuned, beta, "tuned"),
            Member(reference, -beta, "reference"))


def reward_interpolation(base: ModelConfig, tuned1: ModelConfig, tuned2: ModelConfig,
                         reference: ModelConfig, lam: float = 0.5) -> tuple[Member, ...]:
    return (Member(base, 1.0, "base"), Member(tuned1, lam, "tuned1"),
            Member(tuned2, 1.0 - lam, "tuned2"), Member(reference, -1.0, "reference"))


# ----------------------------------------------------------------------------- speculative


def accept_or_resample(p: jax.Array, q: jax.Array, draft: jax.Array, key: jax.Array,
                       greedy: bool) -> tuple[jax.Array, jax.Array]:
    """One verification step of speculative sampling.

    Args:
      p, q: target and draft log-probabilities [B, V]; draft: the drafted tokens [B].
    Returns:
      (accepted [B] bool, replacement [B]): the token to emit where the draft is rejected, drawn
      from normalise(max(0, p - q)) (greedy: argmax p).
    """
    if greedy:
        best = jnp.argmax(p, axis=-1).astype(jnp.int32)
        return draft == best, best
    ku, kr = jax.random.split(key)
    lp = jnp.take_along_axis(p, draft[:, None], -1)[:, 0]
    lq = jnp.take_along_axis(q, draft[:, None], -1)[:, 0]
    u = jax.random.uniform(ku, lp.shape)
    accepted = jnp.log(u) < lp - lq
    residual = jnp.maximum(jnp.exp(p) - jnp.exp(q), 0.0)
    # p == q exactly leaves no residual mass: fall back to p (then any draw is correct)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, jnp.exp(p))
    replacement = jax.random.categorical(kr, jnp.log(residual), axis=-1).astype(jnp.int32)
    return accepted, replacement


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpeculativeDecoder:
    """Speculative decoding of a combination, drafted by one of its members (``drafter``).

    Rows of a batch advance together: each round emits ``n + 1`` tokens where ``n`` is the
    smallest number of leading draft tokens accepted by any row (a row that accepted its token
    at position ``n`` keeps it; that token is already a sample from the target distribution).
    """

    decoder: Decoder
    drafter: int
    k: int = 4

    def __post_init__(self):
        if not 0 <= self.drafter < len(self.decoder.members):
            raise ConfigError(f"drafter index {self.drafter} out of range")
        if self.k < 1:
            raise ConfigError(f"speculative k={self.k} must be >= 1")


def _rollback(cache, index):
    """Forget every slot at or after ``index`` (tokens drafted but not accepted)."""
    valid = cache.valid & (jnp.arange(cache.valid.shape[1])[None, :] < index)
    return cache._replace(valid=valid, index=index)


def _one(member: Member, dtype: str) -> Decoder:
    return Decoder(members=(member,), max_new_tokens=1, dtype=dtype)


@functools.partial(jax.jit, static_argnums=0)
def _speculative(sd: SpeculativeDecoder, params, prompts, key):
    dec, k, di = sd.decoder, sd.k, sd.drafter
    b, n_new = prompts[0][0].shape[0], dec.max_new_tokens
    greedy = isinstance(dec.sampler, Greedy)
    transform = dec.sampler.transform
    members = dec.members
    caches, last = prefill(dataclasses.replace(dec, max_new_tokens=n_new + k + 1), params,
                           prompts)

    def feed(i, cache, tokens):
        c, lg = step(_one(members[i], dec.dtype), (params[i],), (cache,), tokens,
                     jnp.ones(tokens.shape, bool))
        return c[0], lg[0]

    def body(s):
        pos, out, caches, last, rounds, accepted = s
        kd, kv, kb = jax.random.split(jax.random.fold_in(key, rounds), 3)
        # 1. the drafter proposes k tokens from its own (transformed) distribution
        def draft(carry, j):
            cache, z = carry
            q = transform(jax.nn.log_softmax(z.astype(jnp.float32), -1))
            tok = (jnp.argmax(q, -1) if greedy else
                   jax.random.categorical(jax.random.fold_in(kd, j), q, -1)).astype(jnp.int32)
            cache, lg = feed(di, cache, tok[:, None])
            return (cache, lg[:, -1]), (tok, q, lg[:, -1])

        (d_cache, _), (toks, q_all, z_all) = jax.lax.scan(draft, (caches[di], last[di]),
                                                          jnp.arange(k))
        drafts = [toks[j] for j in range(k)]
        qs = [q_all[j] for j in range(k)]
        d_logits = [last[di]] + [z_all[j] for j in range(k)]
        drafted = jnp.stack(drafts, 1)  # [B, k]
        # 2. every other member scores the k drafts in one forward
        new_caches, member_logits = [], []
        for i in range(len(members)):
            if i == di:
                new_caches.append(d_cache)
                member_logits.append(d_logits)
                continue
            c, lg = feed(i, caches[i], drafted)
            new_caches.append(c)
            member_logits.append([last[i]] + [lg[:, j] for j in range(k)])
        p = [transform(combine(dec, [ml[j] for ml in member_logits])) for j in range(k + 1)]
        # 3. accept leading drafts; the first rejected one is resampled from max(0, p - q)
        acc, repl = zip(*[accept_or_resample(p[j], qs[j], drafts[j],
                                             jax.random.fold_in(kv, j), greedy)
                          for j in range(k)], strict=True)
        n_row = jnp.sum(jnp.cumprod(jnp.stack(acc, 1).astype(jnp.int32), axis=1), axis=1)
        n = jnp.min(n_row)
        bonus = (jnp.argmax(p[k], -1) if greedy else
                 jax.random.categorical(kb, p[k], -1)).astype(jnp.int32)
        d_ext = jnp.concatenate([drafted, bonus[:, None]], 1)  # [B, k + 1]
        r_ext = jnp.concatenate([jnp.stack(repl, 1), bonus[:, None]], 1)
        t = jnp.where(n_row > n, d_ext[:, n], r_ext[:, n])
        slots = jnp.arange(k + 1)[None, :]
        row = jnp.where(slots < n, d_ext, jnp.where(slots == n, t[:, None], dec.pad_token))
        out = jax.lax.dynamic_update_slice(out, row.astype(jnp.int32), (0, pos))
        # 4. keep the n accepted drafts in every cache, then feed the new token to all
        caches, last = [], []
        for i, c in enumerate(new_caches):
            c = _rollback(c, c.index - k + n)
            c, lg = feed(i, c, t[:, None])
            caches.append(c)
            last.append(lg[:, -1])
        return (pos + n + 1, out, tuple(caches), tuple(last), rounds + 1,
                accepted + jnp.sum(n_row))

    def cond(s):
        pos, out, *_ = s
        stopped = jnp.any(jnp.isin(out, jnp.asarray(dec.stop_tokens or (-1,))), axis=1)
        return (pos < n_new) & ~jnp.all(stopped)

    state = (jnp.zeros((), jnp.int32), jnp.full((b, n_new + k + 1), dec.pad_token, jnp.int32),
             caches, last, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    pos, out, _, _, rounds, accepted = jax.lax.while_loop(cond, body, state)
    return out[:, :n_new], jnp.minimum(pos, n_new), rounds, accepted


@dataclasses.dataclass(frozen=True)
class SpeculativeGeneration(Generation):
    acceptance_rate: float = 0.0  # accepted draft tokens / drafted tokens
    rounds: int = 0


def generate_speculative(sd: SpeculativeDecoder, params, prompts, *, seed: int = 0
                         ) -> SpeculativeGeneration:
    """Like :func:`jaxarith.decode.generate`, drafting with ``sd.drafter``; same distribution."""
    dec = sd.decoder
    batches = prompts if isinstance(prompts[0][0], list | tuple | np.ndarray) else \
        [prompts] * len(dec.members)
    padded = []
    for member, batch in zip(dec.members, batches, strict=True):
        tokens, mask = left_pad(batch, dec.pad_token)
        if tokens.shape[1] + dec.max_new_tokens + sd.k + 1 > member.config.context_length:
            raise ConfigError(f"{member.role}: prompt + max_new_tokens + k exceeds the context")
        padded.append((tokens, mask))
    out, n, rounds, accepted = _speculative(sd, tuple(params), tuple(padded),
                                            jax.random.key(seed))
    out = np.array(out)
    stops = np.isin(out, np.asarray(dec.stop_tokens or (-1,)))
    lengths = np.where(stops.any(1), stops.argmax(1) + 1, int(n))
    for r, length in enumerate(lengths):
        out[r, length:] = dec.pad_token
    b = out.shape[0]
    rate = float(accepted) / max(int(rounds) * sd.k * b, 1)
    return SpeculativeGeneration(out, lengths, np.zeros(out.shape, np.float32), int(rounds),
                                 acceptance_rate=rate, rounds=int(rounds))
