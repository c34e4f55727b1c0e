"""Layers shared by the model families: norms, RoPE, attention with an optional KV cache.

Shapes in comments use B batch, T query length, S key length, D embed, N heads, K kv heads,
G = N / K query heads per kv head, H head dim, F mlp width, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape, logical axes and initialiser of one canonical parameter."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # normal | zeros | ones
    std: float = 0.02


def gathered(table: jax.Array) -> jax.Array:
    """A lookup table replicated before a gather (FSDP all-gathers it; XLA cannot gather from
    a table sharded on both dimensions without a full rematerialisation)."""
    from jaxarith.sharding import constrain

    return constrain(table, (None, None))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * xf.astype(dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE as transformers applies it.

    Args:
      x: [B, T, N, H].
      positions: [B, T] integer positions.
      inv_freq: [H // 2] float32.
    """
    # [B, T, H/2], computed in float32 like HF, then cast to x's dtype.
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb).astype(x.dtype)[:, :, None, :]
    sin = jnp.sin(emb).astype(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class KVCache(NamedTuple):
    """A static-length KV cache for all layers.

    k, v: [L, B, S, K, H]; valid: [B, S] which slots hold real (non-pad) tokens;
    index: int32 scalar, the next slot to write (shared by the batch: prompts are left-padded).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def attention_mask(q_slots: jax.Array, key_valid: jax.Array) -> jax.Array:
    """Causal + key-padding mask [B, T, S]: query at slot t sees valid keys at slots <= t."""
    s = key_valid.shape[-1]
    causal = jnp.arange(s)[None, :] <= q_slots[:, None]  # [T, S]
    return causal[None, :, :] & key_valid[:, None, :]


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | jax.Array
) -> jax.Array:
    """Grouped-query attention; scores and softmax in float32.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, T, S] bool.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    # [B, K, G, T, S]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def attend_causal(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | jax.Array,
    block: int = 128,
) -> jax.Array:
    """Causal self-attention without a cache, skipping the blocks above the diagonal.

    Queries are taken ``block`` at a time; block i only looks at keys [0, (i+1) * block), so
    scores and softmax cost about half of the dense form (2.7x faster at T=512 on CPU). Same
    arguments as :func:`attend` with S == T and ``mask`` already causal.
    """
    t = q.shape[1]
    if t <= block:
        return attend(q, k, v, mask, scale)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        outs.append(attend(q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end],
                           scale))
    return jnp.concatenate(outs, axis=1)


def update_cache_layer(
    k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Write T new keys/values [B, T, K, H] at slot ``index`` of one layer's cache [B, S, K, H]."""
    zero = jnp.zeros((), jnp.int32)
    start = (zero, index.astype(jnp.int32), zero, zero)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
    return k_cache, v_cache
