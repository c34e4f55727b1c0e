"""Jitted log-likelihood scoring of token sequences under one model or a logit combination.

lm-eval's ``loglikelihood`` asks for ``log p(continuation | context)`` and whether the
continuation is the greedy one. :func:`score_requests` answers a list of such requests in fixed
shapes: requests are sorted by length (longest first), cut into batches of ``batch_size`` rows
(the last one padded with dummy rows), and each batch is right-padded to the smallest *length
bucket* that holds its longest row. The jitted scorer therefore compiles at most one program per
bucket, whatever the number of distinct lengths in a task.

Each row is scored exactly as lm-eval's HF backend does it: the input is
``(context + continuation)[-(max_length + 1):][:-1]`` and the last ``len(continuation)``
positions are scored. For a combination (proxy tuning, EFT) the distribution at every position
is :func:`jaxarith.decode.combine` of the members' logits, the same one the decoder samples from.

Shapes: B batch rows, T padded length (a bucket), V vocabulary.
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
def _score_batch(spec: DecodeSpec, params, weights, tokens, mask, targets, scored):
    """Per-row (sum of log p(target), every target greedy) over the ``scored`` positions.

    Args:
      tokens, mask, targets, scored: [B, T] int32 (mask and scored 0/1); ``targets`` is
        ``tokens`` shifted left by one.
    Returns:
      (log p(target) [B, T] float32, 0 where not scored; is_greedy [B] bool).
    """
    logits = [forward(p, m.config, tokens, attention_mask=mask, dtype=jnp.dtype(spec.dtype))[0]
              for m, p in zip(spec.members, params, strict=True)]
    logp = combine(spec, logits, weights)  # [B, T, V] float32
    scored = scored.astype(bool)
    lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
    greedy = jnp.argmax(logp, axis=-1) == targets
    # per-token values go to the host, which sums them in float64
    return jnp.where(scored, lp, 0.0), jnp.all(greedy | ~scored, axis=-1)


def compiled_programs() -> int:
    """How many programs the scorer has compiled in this process (for the boundedness test)."""
    return _score_batch._cache_size()


def _rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int):
    """(input ids, target ids, number scored) per request, cut as lm-eval's HF backend does."""
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
        if not len(ctx) or not len(cont):
            raise ConfigError(f"request {i}: empty context or continuation tokens")
        if len(cont) > max_length:
            raise ConfigError(f"request {i}: continuation of {len(cont)} tokens exceeds "
                              f"max_length={max_length}")
        whole = (list(ctx) + list(cont))[-(max_length + 1):]
        rows.append((whole[:-1], whole[1:], len(cont)))
    return rows


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

    Args:
      spec: the members (their configs and weights) and compute dtype; its sampler and lengths
        are unused here.
      params: one parameter tree per member.
      pairs: (context ids, continuation ids), both non-empty.
      max_length: the model window; longer inputs lose tokens on the left (as in lm-eval).
      batch_size: rows per call (rounded up to the mesh's data-parallel size).
      buckets: padded lengths (see :func:`length_buckets`); the last must be >= ``max_length``.
      mesh: score sharded on this mesh (params already placed on it).
      on_batch: called with the number of requests done after each batch (progress).
    """
    rows = _rows(pairs, max_length)
    if mesh is not None:
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        batch_size = -(-batch_size // dp) * dp
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    weights = member_weights(spec)
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with ctx:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            t = bucket_for(len(rows[idx[0]][0]), buckets)
            arrays = np.zeros((4, batch_size, t), np.int32)  # tokens, mask, targets, scored
            arrays[0] = pad_token
            for r, i in enumerate(idx):
                inp, tgt, n = rows[i]
                arrays[0, r, :len(inp)], arrays[1, r, :len(inp)] = inp, 1
                arrays[2, r, :len(tgt)] = tgt
                arrays[3, r, len(inp) - n:len(inp)] = 1
            arrays[1, len(idx):, 0] = 1  # dummy rows: one real token keeps softmax finite
            placed = [a if mesh is None else
                      jax.device_put(a, sharding.named_sharding(mesh, ("batch", "seq"), a.shape))
                      for a in arrays]
            total, greedy = _score_batch(spec, tuple(params), weights, *placed)
            total = np.asarray(total, np.float64).sum(-1)
            greedy = np.asarray(greedy)
            for r, i in enumerate(idx):
                out[i] = (float(total[r]), bool(greedy[r]))
            if on_batch is not None:
                on_batch(len(idx))
    return out  # type: ignore[return-value]
