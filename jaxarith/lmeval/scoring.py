"""Jitted log-likelihood scoring of token sequences under one model or a logit combination.

lm-eval's ``loglikelihood`` asks for ``log p(continuation | context)`` and whether the
continuation is the greedy one; a multiple-choice document sends one request per choice, all
with the same context. :func:`score_requests` groups requests by their (window-cut) context:

* a context shared by several requests runs once, into a KV cache; the cache is gathered to one
  row per continuation and the continuations run from it (:func:`_score_groups`);
* a request with a context of its own (rolling-perplexity windows, single continuations) runs
  as one causal row (:func:`_score_rows`).

Either way the output head and the log-softmax run only at the scored positions (gathered
hidden states), not over the whole padded row. Batches hold ``batch_size`` contexts; contexts,
continuations and rows are right-padded to the smallest *score bucket* (8, 16, 24, 32, 48, 64,
96, ..., ``max_length``: at most 1.5x the longest above 16 tokens) that holds them, so the
scorer compiles a bounded number of programs whatever the number of distinct lengths.

Each request is scored exactly as lm-eval's HF backend does it: the input is
``(context + continuation)[-(max_length + 1):][:-1]`` and the last ``len(continuation)``
positions are scored (the split into a context and ``continuation[:-1]`` computes the same
causal forward pass). For a combination (proxy tuning, EFT) every member runs the same scheme
and the distribution at every scored position is :func:`jaxarith.decode.combine` of the
members' logits, the same one the decoder samples from.

Shapes: G contexts, R rows (continuations), B rows, T/Tp/Ts padded lengths (score buckets), K
scored positions, V vocabulary.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxarith import sharding
from jaxarith.decode import DecodeSpec, combine, member_weights
from jaxarith.errors import ConfigError
from jaxarith.models import transformer
from jaxarith.models.transformer import forward


def length_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Padded lengths: powers of two from ``smallest`` below ``max_length``, then ``max_length``.

    A row of n tokens goes to the first bucket >= n, so at most twice its length is computed
    while the number of programs is ``log2(max_length / smallest) + 2`` at most.
    """
    if max_length < 1:
        raise ConfigError(f"max_length={max_length} must be at least 1")
    out, n = [], smallest
    while n < max_length:
        out.append(n)
        n *= 2
    return (*out, max_length)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``n`` tokens."""
    for b in buckets:
        if n <= b:
            return b
    raise ConfigError(f"a sequence of {n} tokens exceeds the largest bucket {buckets[-1]}")


@functools.partial(jax.jit, static_argnums=0)
def _score_groups(spec: DecodeSpec, params, weights, prefix, prefix_mask, last, group, suffix,
                  suffix_mask, targets):
    """Per-token log p(target) and per-row greedy flags of one batch of context groups.

    Each context (prefix) runs once into a KV cache; the cache is gathered to the rows (one row
    per continuation of a context) and the rows' suffixes run from it. The output head and
    log-softmax run only at the scored positions: each prefix's last real token (it predicts a
    continuation's first token) and the suffix positions.

    Args:
      prefix, prefix_mask: [G, Tp] right-padded contexts (mask 0/1).
      last: [G] position of each prefix's last real token.
      group: [R] the prefix of each row.
      suffix, suffix_mask: [R, Ts] right-padded ``continuation[:-1]`` per row.
      targets: [R, 1 + Ts] the continuation (position 0 is predicted from the prefix).
    Returns:
      (log p(target) [R, 1 + Ts] float32, 0 where not scored; is_greedy [R] bool).
    """
    dtype = jnp.dtype(spec.dtype)
    g, tp = prefix.shape
    ts = suffix.shape[1]
    logits = []
    for m, p in zip(spec.members, params, strict=True):
        cfg = m.config
        cache = transformer.init_cache(cfg, g, tp + ts, dtype)
        h0, cache = forward(p, cfg, prefix, attention_mask=prefix_mask, cache=cache, dtype=dtype,
                            hidden_only=True)
        h0 = jnp.take_along_axis(h0, last[:, None, None], axis=1)  # [G, 1, D]
        cache = cache._replace(k=jnp.take(cache.k, group, axis=1),
                               v=jnp.take(cache.v, group, axis=1),
                               valid=jnp.take(cache.valid, group, axis=0))
        h1, _ = forward(p, cfg, suffix, attention_mask=suffix_mask, cache=cache, dtype=dtype,
                        hidden_only=True)
        h = jnp.concatenate([jnp.take(h0, group, axis=0), h1], axis=1)  # [R, 1 + Ts, D]
        logits.append(transformer.family(cfg).unembed(cfg, p, h).astype(jnp.float32))
    logp = combine(spec, logits, weights)  # [R, 1 + Ts, V] float32
    scored = jnp.concatenate([jnp.ones_like(suffix_mask[:, :1]), suffix_mask], axis=1) > 0
    return _token_scores(logp, targets, scored)


@functools.partial(jax.jit, static_argnums=0)
def _score_rows(spec: DecodeSpec, params, weights, tokens, mask, at, targets, scored):
    """Per-token log p(target) and per-row greedy flags of rows that share no context.

    One causal forward per row (no cache); the output head and log-softmax run only at the K
    gathered positions ``at`` (the scored ones).

    Args:
      tokens, mask: [B, T] right-padded rows (context + continuation[:-1]).
      at: [B, K] the positions whose next token is scored; targets, scored: [B, K].
    Returns:
      (log p(target) [B, K] float32, 0 where not scored; is_greedy [B] bool).
    """
    dtype = jnp.dtype(spec.dtype)
    logits = []
    for m, p in zip(spec.members, params, strict=True):
        cfg = m.config
        h, _ = forward(p, cfg, tokens, attention_mask=mask, dtype=dtype, hidden_only=True)
        h = jnp.take_along_axis(h, at[..., None], axis=1)  # [B, K, D]
        logits.append(transformer.family(cfg).unembed(cfg, p, h).astype(jnp.float32))
    return _token_scores(combine(spec, logits, weights), targets, scored > 0)


def _token_scores(logp, targets, scored):
    lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logp, axis=-1) == targets
    # per-token values go to the host, which sums them in float64
    return jnp.where(scored, lp, 0.0), jnp.all(greedy | ~scored, axis=-1)


def compiled_programs() -> int:
    """How many programs the scorer has compiled in this process (for the boundedness test)."""
    return _score_groups._cache_size() + _score_rows._cache_size()


def score_buckets(max_length: int, smallest: int = 8) -> tuple[int, ...]:
    """Padded lengths of the scorer's contexts and continuations: ``smallest``, then steps of
    about 1.5x (8, 16, 24, 32, 48, 64, 96, ...), then ``max_length``.

    Finer than :func:`length_buckets` (at most 1.5x the tokens of the longest row, 2x below
    16): the scorer's rows are short (a context, or a continuation) and padding is most of
    their cost. The number of programs stays ``O(log(max_length))`` per dimension.
    """
    if max_length < 1:
        raise ConfigError(f"max_length={max_length} must be at least 1")
    out, n = [], smallest
    while n < max_length:
        out.append(n)
        n = 2 * n if n < 16 else n * 3 // 2 if n & (n - 1) == 0 else 2 ** n.bit_length()
    return (*out, max_length)


def _rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int):
    """(prefix, suffix, targets) per request, cut as lm-eval's HF backend does.

    The HF backend scores ``whole = (context + continuation)[-(max_length + 1):]``: input
    ``whole[:-1]``, the last ``len(continuation)`` positions scored. Here that input is split
    into the prefix ``whole[:-len(continuation)]`` (the context, left-truncated; its last token
    predicts the continuation's first) and the suffix ``continuation[:-1]``.
    """
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
        if not len(ctx) or not len(cont):
            raise ConfigError(f"request {i}: empty context or continuation tokens")
        if len(cont) > max_length:
            raise ConfigError(f"request {i}: continuation of {len(cont)} tokens exceeds "
                              f"max_length={max_length}")
        whole = (list(ctx) + list(cont))[-(max_length + 1):]
        n = len(cont)
        rows.append((tuple(whole[:-n]), whole[-n:-1], whole[-n:]))
    return rows


def _batches(rows, batch_size: int, buckets: Sequence[int]):
    """Batches of context groups: (groups per call, rows per call, groups), groups being lists
    of request indices with one prefix.

    Groups are classed by their size rounded up to a power of two ``m`` (multiple choice with 4
    choices: 4; rolling windows: 1); a batch holds ``batch_size`` groups of one class and
    ``batch_size * m`` rows. Groups of one (m = 1) are scored as whole rows by
    :func:`_score_rows`, the others by :func:`_score_groups`. Within a class groups are
    sorted by their padded lengths, so a batch's shape fits its groups closely and few shapes
    occur.
    """
    groups: dict[tuple, list[int]] = {}
    for i, (prefix, suffix, _) in enumerate(rows):
        # sharing saves the context's tokens once per extra row: worth a second forward pass
        # only when the context is at least as long as the continuation (not for rolling
        # windows, whose one-token contexts are often equal)
        groups.setdefault(prefix if len(prefix) >= len(suffix) else (-1, i), []).append(i)
    classes: dict[int, list[list[int]]] = {}
    for idx in groups.values():
        classes.setdefault(1 << (len(idx) - 1).bit_length(), []).append(idx)

    def key(idx):
        p, s, x = rows[idx[0]]
        if len(idx) == 1:  # a whole row (see _score_rows): its length, its scored positions
            return bucket_for(len(p) + len(s), buckets), bucket_for(len(x), buckets)
        return (bucket_for(len(p), buckets),
                bucket_for(max(1, *(len(rows[i][1]) for i in idx)), buckets))

    for m in sorted(classes):
        found = sorted(classes[m], key=key, reverse=True)
        for start in range(0, len(found), batch_size):
            yield batch_size, batch_size * m, found[start:start + batch_size]


def score_requests(
    spec: DecodeSpec,
    params: Sequence[dict],
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_length: int,
    batch_size: int,
    buckets: Sequence[int],
    mesh: jax.sharding.Mesh | None = None,
    pad_token: int = 0,
    on_batch=None,
) -> list[tuple[float, bool]]:
    """``(log p(cont | ctx), is_greedy)`` per ``(ctx, cont)`` token pair, in the given order.

    Requests with the same (truncated) context share one run of it (see :func:`_score_groups`).

    Args:
      spec: the members (their configs and weights) and compute dtype; its sampler and lengths
        are unused here.
      params: one parameter tree per member.
      pairs: (context ids, continuation ids), both non-empty.
      max_length: the model window; longer inputs lose tokens on the left (as in lm-eval).
      batch_size: contexts per call (rounded up to the mesh's data-parallel size); a call scores
        every continuation of its contexts (``batch_size * m`` rows, m the number of
        continuations per context rounded up to a power of two).
      buckets: padded lengths of contexts and continuations (see :func:`score_buckets`); the
        last must be >= ``max_length``.
      mesh: score sharded on this mesh (params already placed on it).
      on_batch: called with the number of requests done after each batch (progress).
    """
    rows = _rows(pairs, max_length)
    if mesh is not None:
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        batch_size = -(-batch_size // dp) * dp
    weights = member_weights(spec)
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()

    def place(a, axes):
        if mesh is None:
            return a
        return jax.device_put(a, sharding.named_sharding(mesh, axes, a.shape))

    with ctx:
        for n_groups, n_rows, groups in _batches(rows, batch_size, buckets):
            if n_rows == n_groups:  # no shared contexts: whole rows, one forward
                order = [g[0] for g in groups]
                arrays = _row_arrays([rows[i] for i in order], n_rows, buckets, pad_token)
                lp, greedy = _score_rows(spec, tuple(params), weights, *(
                    place(a, ("batch", "seq") if a.ndim == 2 else ("batch",)) for a in arrays))
            else:
                order = [i for g in groups for i in g]
                arrays = _group_arrays(rows, groups, n_groups, n_rows, buckets, pad_token)
                lp, greedy = _score_groups(spec, tuple(params), weights, *(
                    place(a, ("batch", "seq") if a.ndim == 2 else ("batch",)) for a in arrays))
            total = np.asarray(lp, np.float64).sum(-1)
            greedy = np.asarray(greedy)
            for r, i in enumerate(order):
                out[i] = (float(total[r]), bool(greedy[r]))
            if on_batch is not None:
                on_batch(len(order))
    return out  # type: ignore[return-value]


def _row_arrays(rows, n_rows: int, buckets: Sequence[int], pad_token: int):
    """tokens, mask, at, targets, scored of :func:`_score_rows` for ``rows`` (plus dummies)."""
    t = bucket_for(max(len(p) + len(s) for p, s, _ in rows), buckets)
    k = bucket_for(max(len(x) for _, _, x in rows), buckets)
    tokens = np.full((n_rows, t), pad_token, np.int32)
    mask = np.zeros((n_rows, t), np.int32)
    mask[:, 0] = 1  # dummy rows: one real token keeps softmax finite
    at = np.zeros((n_rows, k), np.int32)
    targets = np.zeros((n_rows, k), np.int32)
    scored = np.zeros((n_rows, k), np.int32)
    for r, (p, s, x) in enumerate(rows):
        n, m = len(p) + len(s), len(x)
        tokens[r, :len(p)], tokens[r, len(p):n], mask[r, :n] = p, s, 1
        at[r, :m] = np.arange(n - m, n)
        targets[r, :m], scored[r, :m] = x, 1
    return tokens, mask, at, targets, scored


def _group_arrays(rows, groups, n_groups: int, n_rows: int, buckets: Sequence[int],
                  pad_token: int):
    """prefix, prefix_mask, last, group, suffix, suffix_mask, targets of :func:`_score_groups`."""
    tp = bucket_for(max(len(rows[g[0]][0]) for g in groups), buckets)
    ts = bucket_for(max(1, *(len(rows[i][1]) for g in groups for i in g)), buckets)
    prefix = np.full((n_groups, tp), pad_token, np.int32)
    prefix_mask = np.zeros((n_groups, tp), np.int32)
    prefix_mask[:, 0] = 1  # dummy groups: one real token keeps softmax finite
    last = np.zeros(n_groups, np.int32)
    group = np.zeros(n_rows, np.int32)
    suffix = np.full((n_rows, ts), pad_token, np.int32)
    suffix_mask = np.zeros((n_rows, ts), np.int32)
    targets = np.zeros((n_rows, 1 + ts), np.int32)
    r = 0
    for g, idx in enumerate(groups):
        p = rows[idx[0]][0]
        prefix[g, :len(p)], prefix_mask[g, :len(p)], last[g] = p, 1, len(p) - 1
        for i in idx:
            _, s, t = rows[i]
            group[r] = g
            suffix[r, :len(s)], suffix_mask[r, :len(s)] = s, 1
            targets[r, :len(t)] = t
            r += 1
    return prefix, prefix_mask, last, group, suffix, suffix_mask, targets
