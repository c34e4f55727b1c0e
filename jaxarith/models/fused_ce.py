"""Fused, chunked next-token cross-entropy over the output projection.

``linear_cross_entropy(h, w, targets, weights)`` is ``sum(weights * nll(softmax(h @ w), targets))``
without ever holding the full ``[B, T, V]`` logits or their gradient. The sequence is cut into
chunks; each chunk's logits are made, reduced to its NLL and (when differentiated) turned at once
into that chunk's share of the two gradients, then dropped.

The gradients are computed in the forward pass (as Liger-Kernel's fused linear cross-entropy
does): the loss is a scalar, so the cotangent that reaches it is a scalar too and the backward
pass only scales the two saved gradients. That removes the ``[B, T, V]`` logits gradient, its
transposed copy for the weight gradient and the recomputation a plain chunked loss would need:
on the CPU the vocabulary projection's backward was a third of a 100M model's training step (see
docs/benchmarks.md).

With ``softcap`` (Gemma 2's ``final_logit_softcapping``) the logits are ``c * tanh(h @ w / c)``;
the chain rule adds the factor ``1 - tanh^2 = 1 - (capped / c)^2`` to the logits gradient.

Called without differentiation (evaluation), only the chunked logits and their log-sum-exp are
computed. Numerics follow the unfused path: logits in the compute dtype cast to float32, softmax
in float32, the logits gradient cast back to the compute dtype before the two matmuls, as autodiff
of ``einsum(h, w.astype(h.dtype)).astype(float32)`` does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxarith.models.layers import dense, soft_cap
from jaxarith.sharding import constrain

__all__ = ["linear_cross_entropy", "chunk_length"]

# Target elements of one chunk's float32 logits (B * C * V): 16M = 64 MB.
CHUNK_ELEMENTS = 1 << 24


def chunk_length(batch: int, seq: int, vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """The largest divisor of ``seq`` whose chunk ``[batch, C, vocab]`` has at most ``elements``
    (at least 1)."""
    limit = max(1, elements // max(1, batch * vocab))
    return max(c for c in range(1, min(seq, limit) + 1) if seq % c == 0)


def _project(h: jax.Array, w: jax.Array, vocab_major: bool, softcap: float | None) -> jax.Array:
    """Logits [B, C, V] in float32 of the hidden chunk ``h`` [B, C, D] (as ``layers.dense``),
    soft-capped when ``softcap`` is set."""
    return soft_cap(dense(h, w, w_transposed=vocab_major).astype(jnp.float32), softcap)


def _vocab_sharded(w: jax.Array, vocab_major: bool) -> jax.Array:
    """The head, sharded over its vocabulary along the batch's mesh axes (on a mesh).

    Each chunk's rows of the whole batch are gathered (a few MB), each device makes the logits
    of its vocabulary slice, the log-sum-exp is reduced across devices, the weight gradient of a
    vocabulary slice stays on its device and the hidden-state gradient is reduce-scattered back
    to the batch sharding. Without this the FSDP-sharded head was all-gathered whole (bf16
    ``[D, V]``: 1 GB per chip for Llama-3.1-8B) and every chunk all-reduced a whole ``[D, V]``
    weight gradient.
    """
    return constrain(w, ("batch", None) if vocab_major else (None, "batch"))


def _rows(x: jax.Array) -> jax.Array:
    """A chunk with every batch row on every device (on a mesh)."""
    return constrain(x, (None,) * x.ndim)


def _chunks(x: jax.Array, c: int) -> jax.Array:
    """[B, T, ...] -> [T / c, B, c, ...] (scanned over the leading axis)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // c, c, *x.shape[2:]), 1, 0)


def _unchunk(x: jax.Array) -> jax.Array:
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _nll_chunk(h, w, tgt, wt, vocab_major, softcap):
    h, tgt, wt = _rows(h), _rows(tgt), _rows(wt)
    logits = constrain(_project(h, w, vocab_major, softcap), (None, None, "batch"))
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    # per row, back on the row's device: each device sums its own rows over the chunks and the
    # devices' sums are added last (the order of the unsharded loss)
    return constrain(jnp.sum((lse - picked) * wt, axis=-1), ("batch",)), logits, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(h, w, targets, weights, vocab_major, chunk, softcap):
    w = _vocab_sharded(w.astype(h.dtype), vocab_major)  # cast once, then resharded

    def body(total, xs):
        hc, tc, wc = xs
        nll, _, _ = _nll_chunk(hc, w, tc, wc, vocab_major, softcap)
        return total + nll, None

    rows = constrain(jnp.zeros(h.shape[:1], jnp.float32), ("batch",))
    rows, _ = jax.lax.scan(body, rows,
                           (_chunks(h, chunk), _chunks(targets, chunk), _chunks(weights, chunk)))
    return jnp.sum(rows)


def _fused_fwd(h, w, targets, weights, vocab_major, chunk, softcap):
    w_dtype = w.dtype
    wc_ = _vocab_sharded(w.astype(h.dtype), vocab_major)  # cast once, then resharded

    def grads(hc, tc, wc):
        """One chunk's NLL, its hidden-state gradient and its share of the weight gradient."""
        nll, logits, lse = _nll_chunk(hc, wc_, tc, wc, vocab_major, softcap)
        hc, tc, wc = _rows(hc), _rows(tc), _rows(wc)
        # d nll / d logits = weight * (softmax - onehot), float32, then the compute dtype
        g = jnp.exp(logits - lse[..., None])
        g = g - jax.nn.one_hot(tc, logits.shape[-1], dtype=g.dtype)
        if softcap is not None:  # logits = c tanh(z / c): dz = dlogits * (1 - tanh^2)
            g = g * (1.0 - jnp.square(logits / softcap))
        g = (g * wc[..., None]).astype(h.dtype)
        b, c, d = hc.shape
        g2, h2 = g.reshape(b * c, -1), hc.reshape(b * c, d)
        if vocab_major:  # w [V, D]
            dh, dw = g2 @ wc_, g2.T @ h2
        else:  # w [D, V]
            dh, dw = g2 @ wc_.T, h2.T @ g2
        dh = constrain(dh.reshape(b, c, d), ("batch", None, None))
        return nll, dh, _vocab_sharded(dw.astype(jnp.float32), vocab_major)

    def body(carry, xs):
        total, dw = carry
        nll, dh, dw_c = grads(*xs)
        return (total + nll, dw + dw_c), dh

    hs, ts, ws = _chunks(h, chunk), _chunks(targets, chunk), _chunks(weights, chunk)
    # the first chunk outside the loop starts the sums: no zero-filled [D, V] accumulator
    total, dh0, dw = grads(hs[0], ts[0], ws[0])
    if hs.shape[0] > 1:
        (total, dw), dh_rest = jax.lax.scan(body, (total, dw), (hs[1:], ts[1:], ws[1:]))
        dh = jnp.concatenate([dh0[None], dh_rest], axis=0)
    else:
        dh = dh0[None]
    return jnp.sum(total), (_unchunk(dh), dw.astype(w_dtype), targets, weights)


def _fused_bwd(vocab_major, chunk, softcap, res, ct):
    dh, dw, targets, weights = res
    del vocab_major, chunk, softcap
    # targets are integers: their cotangent is float0; the weights get none (treated as data)
    zeros_t = jnp.zeros(targets.shape, jax.dtypes.float0)
    return (ct.astype(dh.dtype) * dh, ct.astype(dw.dtype) * dw, zeros_t,
            jnp.zeros_like(weights))


_fused.defvjp(_fused_fwd, _fused_bwd)


def linear_cross_entropy(
    h: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    vocab_major: bool,
    chunk: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """``sum(weights * -log softmax(h @ w)[targets])`` in float32, fused and chunked.

    Args:
      h: final hidden states ``[B, T, D]`` (after the final norm), in the compute dtype.
      w: the output projection: ``[D, V]``, or ``[V, D]`` with ``vocab_major`` (a tied
        embedding). Cast to ``h``'s dtype for the matmuls.
      targets: ``[B, T]`` int token ids to score at each position.
      weights: ``[B, T]`` float weights of each position (0 for no target). Not differentiated.
      chunk: positions per chunk along T (must divide T); default :func:`chunk_length`.
      softcap: the logits are ``softcap * tanh(h @ w / softcap)`` (None: not capped).
    """
    b, t, _ = h.shape
    v = w.shape[0] if vocab_major else w.shape[1]
    chunk = chunk_length(b, t, v) if chunk is None else int(chunk)
    if t % chunk:
        raise ValueError(f"chunk={chunk} does not divide the sequence length {t}")
    return _fused(h, w, targets.astype(jnp.int32), weights.astype(jnp.float32), vocab_major,
                  chunk, None if softcap is None else float(softcap))
