"""Llama 1/2/3.x: canonical parameter layout and one decoder block.

Blocks are stacked on a leading ``layers`` axis (L). Canonical tree::

    embed              [V, D]        (vocab, embed)
    layers/attn_norm/scale [L, D]
    layers/attn/q      [L, D, N, H]  (layers, embed, heads, head_dim)   + q_bias [L, N, H]
    layers/attn/k, v   [L, D, K, H]  (layers, embed, kv_heads, head_dim) + k_bias, v_bias
    layers/attn/o      [L, N, H, D]  (layers, heads, head_dim, embed)   + o_bias [L, D]
    layers/mlp_norm/scale  [L, D]
    layers/mlp/gate, up [L, D, F]    (layers, embed, mlp)  + gate_bias, up_bias [L, F]
    layers/mlp/down    [L, F, D]     (layers, mlp, embed)  + down_bias [L, D]
    final_norm/scale   [D]
    lm_head            [D, V]        (embed, vocab); absent when tie_word_embeddings
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxarith.models.config import LlamaConfig
from jaxarith.models.layers import ParamSpec, gathered, rms_norm, rope


def param_specs(cfg: LlamaConfig) -> dict:
    L, D, N, K, H, F, V = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                           cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size,
                           cfg.vocab_size)
    attn = {
        "q": ParamSpec((L, D, N, H), ("layers", "embed", "heads", "head_dim")),
        "k": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        "v": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        "o": ParamSpec((L, N, H, D), ("layers", "heads", "head_dim", "embed")),
    }
    if cfg.attention_bias:
        attn |= {
            "q_bias": ParamSpec((L, N, H), ("layers", "heads", "head_dim"), "zeros"),
            "k_bias": ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros"),
            "v_bias": ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros"),
            "o_bias": ParamSpec((L, D), ("layers", "norm"), "zeros"),
        }
    mlp = {
        "gate": ParamSpec((L, D, F), ("layers", "embed", "mlp")),
        "up": ParamSpec((L, D, F), ("layers", "embed", "mlp")),
        "down": ParamSpec((L, F, D), ("layers", "mlp", "embed")),
    }
    if cfg.mlp_bias:
        mlp |= {
            "gate_bias": ParamSpec((L, F), ("layers", "mlp"), "zeros"),
            "up_bias": ParamSpec((L, F), ("layers", "mlp"), "zeros"),
            "down_bias": ParamSpec((L, D), ("layers", "norm"), "zeros"),
        }
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed")),
        "layers": {
            "attn_norm": {"scale": ParamSpec((L, D), ("layers", "norm"), "ones")},
            "attn": attn,
            "mlp_norm": {"scale": ParamSpec((L, D), ("layers", "norm"), "ones")},
            "mlp": mlp,
        },
        "final_norm": {"scale": ParamSpec((D,), ("norm",), "ones")},
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
    return specs


def embed(cfg: LlamaConfig, params: dict, tokens: jax.Array, positions: jax.Array, dtype):
    del cfg, positions
    return jnp.take(gathered(params["embed"]), tokens, axis=0).astype(dtype)


def unembed(cfg: LlamaConfig, params: dict, x: jax.Array) -> jax.Array:
    x = rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps)
    if cfg.tie_word_embeddings:
        return jnp.einsum("BTD,VD->BTV", x, params["embed"].astype(x.dtype))
    return jnp.einsum("BTD,DV->BTV", x, params["lm_head"].astype(x.dtype))


def _bias(p: dict, name: str, y: jax.Array) -> jax.Array:
    return y + p[name].astype(y.dtype) if name in p else y


def qkv(cfg: LlamaConfig, p: dict, x: jax.Array, positions: jax.Array, layer_idx, inv_freq):
    """Queries [B,T,N,H] and keys/values [B,T,K,H] of one block, with RoPE applied."""
    del layer_idx
    a = p["attn"]
    h = rms_norm(x, p["attn_norm"]["scale"], cfg.rms_norm_eps)
    q = _bias(a, "q_bias", jnp.einsum("BTD,DNH->BTNH", h, a["q"].astype(h.dtype)))
    k = _bias(a, "k_bias", jnp.einsum("BTD,DKH->BTKH", h, a["k"].astype(h.dtype)))
    v = _bias(a, "v_bias", jnp.einsum("BTD,DKH->BTKH", h, a["v"].astype(h.dtype)))
    return rope(q, positions, inv_freq), rope(k, positions, inv_freq), v


def attn_out_and_mlp(cfg: LlamaConfig, p: dict, x, q, k, v, attn_fn, layer_idx):
    """``attn_fn(q, k, v, scale)`` (masking chosen by the driver), output projection, residual,
    then the SwiGLU MLP."""
    del layer_idx
    a = p["attn"]
    out = attn_fn(q, k, v, scale=cfg.head_dim**-0.5)
    x = x + _bias(a, "o_bias", jnp.einsum("BTNH,NHD->BTD", out, a["o"].astype(out.dtype)))
    m = p["mlp"]
    h = rms_norm(x, p["mlp_norm"]["scale"], cfg.rms_norm_eps)
    gate = _bias(m, "gate_bias", jnp.einsum("BTD,DF->BTF", h, m["gate"].astype(h.dtype)))
    up = _bias(m, "up_bias", jnp.einsum("BTD,DF->BTF", h, m["up"].astype(h.dtype)))
    down = jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, m["down"].astype(h.dtype))
    return x + _bias(m, "down_bias", down)
