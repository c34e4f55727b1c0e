"""GPT-2: canonical parameter layout and one decoder block.

HF's fused ``c_attn`` [D, 3D] (Conv1D, stored [in, out]) is split into q, k, v so that GPT-2 and
Llama share names. Canonical tree::

    embed              [V, D]        (vocab, embed)     tied output head
    pos_embed          [P, D]        (positions, embed)
    layers/attn_norm/{scale,bias} [L, D]
    layers/attn/q, k, v [L, D, N, H] (layers, embed, heads, head_dim)
    layers/attn/q_bias, k_bias, v_bias [L, N, H]
    layers/attn/o      [L, N, H, D]  + o_bias [L, D]
    layers/mlp_norm/{scale,bias}  [L, D]
    layers/mlp/up      [L, D, F] + up_bias [L, F];  layers/mlp/down [L, F, D] + down_bias [L, D]
    final_norm/{scale,bias} [D]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxarith.models.config import GPT2Config
from jaxarith.models.layers import ParamSpec, gathered, layer_norm


def _norm(shape, axes):
    return {"scale": ParamSpec(shape, axes, "ones"), "bias": ParamSpec(shape, axes, "zeros")}


def param_specs(cfg: GPT2Config) -> dict:
    L, D, N, H, F, V = (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_dim,
                        cfg.intermediate_size, cfg.vocab_size)
    qkv_axes = ("layers", "embed", "heads", "head_dim")
    bias_axes = ("layers", "heads", "head_dim")
    return {
        "embed": ParamSpec((V, D), ("vocab", "embed")),
        "pos_embed": ParamSpec((cfg.n_positions, D), ("positions", "embed"), std=0.01),
        "layers": {
            "attn_norm": _norm((L, D), ("layers", "norm")),
            "attn": {
                "q": ParamSpec((L, D, N, H), qkv_axes),
                "k": ParamSpec((L, D, N, H), qkv_axes),
                "v": ParamSpec((L, D, N, H), qkv_axes),
                "q_bias": ParamSpec((L, N, H), bias_axes, "zeros"),
                "k_bias": ParamSpec((L, N, H), bias_axes, "zeros"),
                "v_bias": ParamSpec((L, N, H), bias_axes, "zeros"),
                "o": ParamSpec((L, N, H, D), ("layers", "heads", "head_dim", "embed")),
                "o_bias": ParamSpec((L, D), ("layers", "norm"), "zeros"),
            },
            "mlp_norm": _norm((L, D), ("layers", "norm")),
            "mlp": {
                "up": ParamSpec((L, D, F), ("layers", "embed", "mlp")),
                "up_bias": ParamSpec((L, F), ("layers", "mlp"), "zeros"),
                "down": ParamSpec((L, F, D), ("layers", "mlp", "embed")),
                "down_bias": ParamSpec((L, D), ("layers", "norm"), "zeros"),
            },
        },
        "final_norm": _norm((D,), ("norm",)),
    }


def embed(cfg: GPT2Config, params: dict, tokens: jax.Array, positions: jax.Array, dtype):
    del cfg
    x = jnp.take(gathered(params["embed"]), tokens, axis=0)
    x = x + jnp.take(gathered(params["pos_embed"]), positions, axis=0)
    return x.astype(dtype)


def unembed(cfg: GPT2Config, params: dict, x: jax.Array) -> jax.Array:
    n = params["final_norm"]
    x = layer_norm(x, n["scale"], n["bias"], cfg.layer_norm_epsilon)
    return jnp.einsum("BTD,VD->BTV", x, params["embed"].astype(x.dtype))


def qkv(cfg: GPT2Config, p: dict, x: jax.Array, positions: jax.Array, layer_idx, inv_freq):
    del positions, layer_idx, inv_freq
    a, n = p["attn"], p["attn_norm"]
    h = layer_norm(x, n["scale"], n["bias"], cfg.layer_norm_epsilon)
    q = jnp.einsum("BTD,DNH->BTNH", h, a["q"].astype(h.dtype)) + a["q_bias"].astype(h.dtype)
    k = jnp.einsum("BTD,DNH->BTNH", h, a["k"].astype(h.dtype)) + a["k_bias"].astype(h.dtype)
    v = jnp.einsum("BTD,DNH->BTNH", h, a["v"].astype(h.dtype)) + a["v_bias"].astype(h.dtype)
    return q, k, v


def attn_out_and_mlp(cfg: GPT2Config, p: dict, x, q, k, v, attn_fn, layer_idx):
    a = p["attn"]
    scale = jnp.float32(cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0)
    if cfg.scale_attn_by_inverse_layer_idx:
        scale = scale / (layer_idx + 1).astype(jnp.float32)
    # Scores and softmax are always float32 here, which is what reorder_and_upcast_attn asks for.
    out = attn_fn(q, k, v, scale=scale)
    x = x + jnp.einsum("BTNH,NHD->BTD", out, a["o"].astype(out.dtype)) + a["o_bias"].astype(x.dtype)
    m, n = p["mlp"], p["mlp_norm"]
    h = layer_norm(x, n["scale"], n["bias"], cfg.layer_norm_epsilon)
    h = jnp.einsum("BTD,DF->BTF", h, m["up"].astype(h.dtype)) + m["up_bias"].astype(h.dtype)
    h = jax.nn.gelu(h, approximate=True)
    h = jnp.einsum("BTF,FD->BTD", h, m["down"].astype(h.dtype)) + m["down_bias"].astype(h.dtype)
    return x + h
