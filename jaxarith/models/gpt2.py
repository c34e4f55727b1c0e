"""GPT-2 family: config, parameter table, block, HF rules.

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

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxarith.errors import ConfigError
from jaxarith.models.family import (
    Arch,
    BlockContext,
    Family,
    Inputs,
    ParamSpec,
    Rule,
    check_hf_keys,
    check_positive,
    copy_rule,
    require,
)
from jaxarith.models.layers import dense, layer_norm, lookup
from jaxarith.models.remat import KEY_PROJ, MLPWI, MLPWO, OUT_PROJ, QUERY_PROJ, VALUE_PROJ

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """GPT-2 decoder configuration (HF names: n_embd, n_layer, n_head, n_positions)."""

    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int = 1024
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str = "gpt2"
    hf_extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    arch: ClassVar[Arch] = Arch.GPT2
    HF_KEYS_READ: ClassVar[frozenset[str]] = frozenset({
        "model_type", "vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "n_inner",
        "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn", "tie_word_embeddings", "bos_token_id", "eos_token_id",
        "pad_token_id", "activation_function",
    })
    # HF keys of GPT-2 configs that change nothing in inference here (dropout, the sequence
    # summary head of the double-heads model, the original config's n_ctx = n_positions).
    HF_KEYS_IGNORED: ClassVar[frozenset[str]] = frozenset({
        "attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_activation", "summary_first_dropout",
        "summary_proj_to_labels", "summary_type", "summary_use_proj", "n_ctx",
        "gradient_checkpointing",
    })

    def __post_init__(self):
        check_positive(self, ("vocab_size", "n_embd", "n_layer", "n_head"))
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if not self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings=False is not supported for gpt2")

    @classmethod
    def check_keys(cls, d: dict[str, Any], where: str = "config") -> None:
        """Raise :class:`ConfigError` naming any key of ``d`` this family does not know."""
        check_hf_keys(cls, d, where)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> GPT2Config:
        cls.check_keys(d)
        d = dict(d)
        act = d.get("activation_function", "gelu_new")
        if act != "gelu_new":
            raise ConfigError(f"activation_function={act!r} is not supported (expected gelu_new)")
        return cls(
            vocab_size=require(d, "vocab_size"),
            n_embd=require(d, "n_embd"),
            n_layer=require(d, "n_layer"),
            n_head=require(d, "n_head"),
            n_positions=d.get("n_positions", 1024),
            n_inner=d.get("n_inner"),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            scale_attn_weights=bool(d.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(d.get("scale_attn_by_inverse_layer_idx", False)),
            reorder_and_upcast_attn=bool(d.get("reorder_and_upcast_attn", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            hf_extra=d,
        )

    def to_hf(self) -> dict[str, Any]:
        d = dict(self.hf_extra)
        d.update(
            model_type="gpt2",
            architectures=d.get("architectures") or ["GPT2LMHeadModel"],
            vocab_size=self.vocab_size,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_positions=self.n_positions,
            n_inner=self.n_inner,
            layer_norm_epsilon=self.layer_norm_epsilon,
            activation_function="gelu_new",
            scale_attn_weights=self.scale_attn_weights,
            scale_attn_by_inverse_layer_idx=self.scale_attn_by_inverse_layer_idx,
            reorder_and_upcast_attn=self.reorder_and_upcast_attn,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        return d

    # Family-independent names used by the shared code.
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def intermediate_size(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def context_length(self) -> int:
        return self.n_positions


# ----------------------------------------------------------------------------- parameters


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


# ----------------------------------------------------------------------------- forward


def embed(cfg: GPT2Config, params: dict, inputs: Inputs) -> jax.Array:
    """Token plus learned position embeddings [B, T, D]."""
    return lookup(params["embed"], inputs.tokens) + lookup(params["pos_embed"], inputs.positions)


def head(cfg: GPT2Config, params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array, bool]:
    """The output head's input and weight: (final-normed x, the tied embedding [V, D], True)."""
    n = params["final_norm"]
    return layer_norm(x, n["scale"], n["bias"], cfg.layer_norm_epsilon), params["embed"], True


def unembed(cfg: GPT2Config, params: dict, x: jax.Array) -> jax.Array:
    h, w, vocab_major = head(cfg, params, x)
    return dense(h, w, w_transposed=vocab_major)


def block(cfg: GPT2Config, p: dict, x: jax.Array, ctx: BlockContext) -> jax.Array:
    """One pre-norm block: LayerNorm, attention, residual; LayerNorm, GELU MLP, residual."""
    a, n = p["attn"], p["attn_norm"]
    h = layer_norm(x, n["scale"], n["bias"], cfg.layer_norm_epsilon)
    # tagged for the remat policies (jaxarith.models.remat); checkpoint_name is the identity
    q = checkpoint_name(dense(h, a["q"]) + a["q_bias"].astype(h.dtype), QUERY_PROJ)
    k = checkpoint_name(dense(h, a["k"]) + a["k_bias"].astype(h.dtype), KEY_PROJ)
    v = checkpoint_name(dense(h, a["v"]) + a["v_bias"].astype(h.dtype), VALUE_PROJ)
    scale = jnp.float32(cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0)
    if cfg.scale_attn_by_inverse_layer_idx:
        scale = scale / (ctx.layer + 1).astype(jnp.float32)
    # Scores and softmax are always float32 here, which is what reorder_and_upcast_attn asks for.
    out = ctx.attention(q, k, v, scale=scale)
    x = x + checkpoint_name(dense(out, a["o"], 2), OUT_PROJ) + a["o_bias"].astype(x.dtype)
    m, n = p["mlp"], p["mlp_norm"]
    h = layer_norm(x, n["scale"], n["bias"], cfg.layer_norm_epsilon)
    h = checkpoint_name(dense(h, m["up"]) + m["up_bias"].astype(h.dtype), MLPWI)
    h = jax.nn.gelu(h, approximate=True)
    h = checkpoint_name(dense(h, m["down"]) + m["down_bias"].astype(h.dtype), MLPWO)
    return x + h


# ----------------------------------------------------------------------------- HF conversion


def hf_rules(cfg: GPT2Config) -> list[Rule]:
    """HF ``GPT2LMHeadModel`` tensors (``Conv1D`` weights stored ``[in, out]``)."""
    D, N, H, F, V, P = (cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.intermediate_size,
                        cfg.vocab_size, cfg.n_positions)
    p = "transformer.h.{i}."
    L = ("layers",)

    def norm(hf, canon, shape, layer):
        base = L if layer else ()
        return [copy_rule(hf + ".weight", base + (canon, "scale"), shape),
                copy_rule(hf + ".bias", base + (canon, "bias"), shape)]

    qkv = tuple(L + ("attn", n) for n in "qkv")
    qkv_b = tuple(L + ("attn", f"{n}_bias") for n in "qkv")
    return [
        copy_rule("transformer.wte.weight", ("embed",), (V, D)),
        copy_rule("transformer.wpe.weight", ("pos_embed",), (P, D)),
        *norm("transformer.ln_f", "final_norm", (D,), False),
        *norm(p + "ln_1", "attn_norm", (D,), True),
        *norm(p + "ln_2", "mlp_norm", (D,), True),
        # Conv1D stores [in, out]; c_attn's out is q | k | v.
        Rule(p + "attn.c_attn.weight", qkv, (D, 3 * D),
             lambda w: tuple(w[:, j * D:(j + 1) * D].reshape(D, N, H) for j in range(3)),
             lambda q, k, v: np.concatenate([a.reshape(D, D) for a in (q, k, v)], axis=1)),
        Rule(p + "attn.c_attn.bias", qkv_b, (3 * D,),
             lambda b: tuple(b[j * D:(j + 1) * D].reshape(N, H) for j in range(3)),
             lambda q, k, v: np.concatenate([a.reshape(D) for a in (q, k, v)])),
        Rule(p + "attn.c_proj.weight", (L + ("attn", "o"),), (D, D),
             lambda w: (w.reshape(N, H, D),), lambda c: c.reshape(D, D)),
        copy_rule(p + "attn.c_proj.bias", L + ("attn", "o_bias"), (D,)),
        copy_rule(p + "mlp.c_fc.weight", L + ("mlp", "up"), (D, F)),
        copy_rule(p + "mlp.c_fc.bias", L + ("mlp", "up_bias"), (F,)),
        copy_rule(p + "mlp.c_proj.weight", L + ("mlp", "down"), (F, D)),
        copy_rule(p + "mlp.c_proj.bias", L + ("mlp", "down_bias"), (D,)),
    ]


def normalize_hf_key(key: str) -> str:
    """Original GPT-2 checkpoints name tensors without the ``transformer.`` prefix."""
    if not key.startswith(("transformer.", "lm_head.")):
        return "transformer." + key
    return key


def with_depth(cfg: GPT2Config, n: int) -> GPT2Config:
    """``cfg`` with ``n`` layers (``n_layer``)."""
    return dataclasses.replace(cfg, n_layer=n, hf_extra={**cfg.hf_extra, "n_layer": n})


def depth_sensitive(cfg: GPT2Config) -> str | None:
    if cfg.scale_attn_by_inverse_layer_idx:
        return ("scale_attn_by_inverse_layer_idx: GPT-2 scales layer l's attention scores by "
                "1/(l+1)")
    return None


FAMILY = Family(
    arch=Arch.GPT2,
    config_class=GPT2Config,
    model_types=("gpt2",),
    param_specs=param_specs,
    embed=embed,
    block=block,
    unembed=unembed,
    head=head,
    hf_rules=hf_rules,
    # the causal-mask buffers older transformers versions saved
    hf_buffers=(".attn.bias", ".attn.masked_bias"),
    normalize_hf_key=normalize_hf_key,
    with_depth=with_depth,
    depth_sensitive=depth_sensitive,
)
