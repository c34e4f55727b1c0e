"""Layers shared by the model families: norms, RoPE, attention with an optional KV cache.

Shape letters as in :mod:`jaxarith.models` (B batch, T query length, S key / cache length, D embed,
N query heads, K kv heads, G = N / K query heads per kv head, H head dim, F mlp width, V vocab).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxarith.models.family import ParamSpec, parse_enum
from jaxarith.sharding import constrain

__all__ = ["ParamSpec", "RopeType", "RopeScaling", "rope_inv_freq", "rope", "rms_norm",
           "layer_norm", "KVCache", "attention_mask", "key_distance", "windowed", "soft_cap",
           "attend", "attend_causal", "update_cache_layer", "lookup", "to_compute", "dense"]


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[ids]``: the rows ``[..., D]`` of an embedding table ``[V, D]`` for the ids.

    On a mesh the table keeps its ``embed`` dimension sharded (fsdp) and is replicated over its
    vocab dimension only (XLA cannot gather from a table sharded on both dimensions without a
    full rematerialisation); the ids (a few KB) are replicated, so each device gathers its slice
    of ``D`` for every id, and the caller's constraint moves the rows to the batch sharding. The
    gradient, a scatter-add, then goes into each device's own ``[V, D / fsdp]`` shard.
    Replicating the whole table instead made that gradient a full ``[V, D]`` float32 scatter on
    every chip plus its all-reduce: 4.2 GB per chip for Llama-3.1-8B on v5p-8 (docs/scale.md).
    """
    table = constrain(table, (None, "embed"))
    ids = constrain(ids, (None,) * ids.ndim)
    return jnp.take(table, ids, axis=0)


@jax.custom_vjp
def _f32_to_bf16(w: jax.Array) -> jax.Array:
    # round to nearest even on the bits (what XLA's convert does), NaN kept NaN
    u = jax.lax.bitcast_convert_type(w, jnp.uint32)
    u = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
    b = jax.lax.bitcast_convert_type(u.astype(jnp.uint16), jnp.bfloat16)
    return jnp.where(jnp.isnan(w), jnp.asarray(jnp.nan, jnp.bfloat16), b)


_f32_to_bf16.defvjp(lambda w: (_f32_to_bf16(w), None), lambda _, g: (g.astype(jnp.float32),))


def to_compute(w: jax.Array, dtype) -> jax.Array:
    """A weight cast to the compute dtype inside a layer, equal to ``w.astype(dtype)``.

    float32 -> bfloat16 is written as rounding on the bits (with ``astype``'s gradient): the
    TPU compiler hoists a plain ``convert`` of a scanned layer's weight out of the layer loop,
    converting every layer's weights at once and keeping that bfloat16 copy of the whole stack
    alive through the forward and backward loops (2 bytes per layer parameter per chip: 3.5 GB
    per chip for Llama-3.1-8B on v5p-8; docs/scale.md). The bit form stays in the loop.
    """
    dtype = jnp.dtype(dtype)
    if w.dtype == jnp.float32 and dtype == jnp.bfloat16:
        return _f32_to_bf16(w)
    return w.astype(dtype)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, *, w_transposed: bool = False) -> jax.Array:
    """``x [..., *in] @ w [*in, *out] -> [..., *out]`` as one 2-D matmul, in ``x``'s dtype.

    Every projection of the models goes through here: the leading dims are flattened into one
    row axis and the weight into a matrix (reshapes of contiguous arrays, free), so XLA sees a
    plain ``[rows, K] @ [K, N]`` dot. Written as an einsum over ``B, T`` instead, the weight
    gradient contracts two axes and XLA's CPU backend transposed the ``[B, T, F]`` activation
    gradients with a slow strided copy in every layer of the backward pass (25% of a 100M
    model's training step; docs/benchmarks.md).

    Args:
      n_in: how many trailing dims of ``x`` are contracted with the leading dims of ``w``.
      w_transposed: ``w`` is ``[*out, *in]`` instead (a tied embedding ``[V, D]`` as output head).
    """
    lead, k_shape = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
    k = math.prod(k_shape)
    w = to_compute(w, x.dtype)
    if w_transposed:
        out_shape = w.shape[:w.ndim - n_in]
        y = x.reshape(-1, k) @ w.reshape(-1, k).T
    else:
        out_shape = w.shape[n_in:]
        y = x.reshape(-1, k) @ w.reshape(k, -1)
    return y.reshape(*lead, *out_shape)


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


# ----------------------------------------------------------------------------- RoPE


class RopeType(enum.StrEnum):
    """HF ``rope_type`` values implemented here."""

    DEFAULT = "default"
    LINEAR = "linear"
    LLAMA3 = "llama3"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling, as HF's ``rope_scaling`` / ``rope_parameters``."""

    rope_type: RopeType = RopeType.DEFAULT
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        parse_enum(RopeType, self.rope_type, "rope_scaling.rope_type")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> tuple[float, RopeScaling]:
        """(rope_theta, scaling) from an HF config dict: the transformers 4.x ``rope_theta`` /
        ``rope_scaling`` keys or the 5.x ``rope_parameters`` dict."""
        params = d.get("rope_parameters") or {}
        legacy = d.get("rope_scaling") or {}
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        src = legacy or params
        rope_type = src.get("rope_type", src.get("type", "default"))
        if rope_type == "default" or not src:
            return float(theta), cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in src.items() if k in fields}
        kwargs["rope_type"] = parse_enum(RopeType, rope_type, "rope_scaling.rope_type")
        return float(theta), cls(**kwargs)

    def to_hf(self) -> dict[str, Any] | None:
        """HF's ``rope_scaling`` dict (None for the default)."""
        if self.rope_type == RopeType.DEFAULT:
            return None
        if self.rope_type == RopeType.LINEAR:
            return {"rope_type": "linear", "factor": self.factor}
        return dataclasses.asdict(self) | {"rope_type": str(self.rope_type)}


def rope_inv_freq(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """Inverse RoPE frequencies [H // 2], float32, exactly as transformers computes them."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if s.rope_type == RopeType.LINEAR:
        inv_freq = inv_freq / np.float32(s.factor)
    elif s.rope_type == RopeType.LLAMA3:
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


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
        if isinstance(self.k, tuple):  # per-layer [B, S, K, H] (transformer.unstack_cache)
            return self.k[0].shape[1]
        return self.k.shape[2]


def attention_mask(q_slots: jax.Array, key_valid: jax.Array) -> jax.Array:
    """Causal + key-padding mask [B, T, S]: query at slot t sees valid keys at slots <= t."""
    s = key_valid.shape[-1]
    causal = jnp.arange(s)[None, :] <= q_slots[:, None]  # [T, S]
    return causal[None, :, :] & key_valid[:, None, :]


def key_distance(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """[B, T, S] int32 ``q_position - k_position`` of queries [B, T] and keys [B, S].

    A sliding window of W keeps the keys with ``distance < W`` (the query and the W - 1 tokens
    before it), as transformers' ``sliding_window_overlay`` (``kv_idx > q_idx - W``, in cache
    positions: between the real tokens of a row, which padding never separates, the same
    distance).
    """
    return (q_positions[:, :, None] - k_positions[:, None, :]).astype(jnp.int32)


def windowed(mask: jax.Array, distance: jax.Array | None, window: int | None) -> jax.Array:
    """``mask`` [B, T, S] restricted to a sliding window of ``window`` keys (None: unchanged);
    ``distance`` [B, T, S] from :func:`key_distance`."""
    if window is None:
        return mask
    return mask & (distance < window)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (Gemma 2's logit soft-capping); ``x`` unchanged when ``cap`` is
    None."""
    if cap is None:
        return x
    return jnp.tanh(x / cap) * cap


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | jax.Array,
    softcap: float | None = None,
) -> jax.Array:
    """Grouped-query attention; scores and softmax in float32.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, T, S] bool.
      softcap: scores (after ``scale``) soft-capped to ``(-softcap, softcap)`` before the mask
        and the softmax, as transformers' Gemma 2 ``attn_logit_softcapping``; None: not capped.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    # [B, K, G, T, S]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = soft_cap(scores * scale, softcap)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def attend_causal(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | jax.Array,
    softcap: float | None = None, window: int | None = None, block: int = 128,
) -> jax.Array:
    """Causal self-attention without a cache, skipping the blocks above the diagonal.

    Queries are taken ``block`` at a time; block i only looks at keys [0, (i+1) * block), so
    scores and softmax cost about half of the dense form (2.7x faster at T=512 on CPU). With a
    sliding ``window`` (``mask`` already windowed, and slots as far apart as positions) the keys
    before slot ``start - window + 1`` are skipped too. Same arguments as :func:`attend` with
    S == T and ``mask`` already causal.
    """
    t = q.shape[1]
    if t <= block:
        return attend(q, k, v, mask, scale, softcap)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        lo = 0 if window is None else max(0, start - window + 1)
        outs.append(attend(q[:, start:end], k[:, lo:end], v[:, lo:end],
                           mask[:, start:end, lo:end], scale, softcap))
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
