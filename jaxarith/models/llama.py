"""Llama 1/2/3.x (and Mistral-style dense) family: config, parameter table, block, HF rules.

Mistral's ``sliding_window`` (every layer attends the last W slots, transformers'
``q - k < W``) is applied by the driver through ``Family.attention_windows``.

Blocks are stacked on a leading ``layers`` axis (L). Canonical tree::

    embed              [V, D]        (vocab, embed)
    layers/attn_norm/scale [L, D]
    layers/attn/q      [L, D, N, H]  (layers, embed, heads, head_dim)   + q_bias [L, N, H]
    layers/attn/k, v   [L, D, K, H]  (layers, embed, kv_heads, head_dim) + k_bias, v_bias
    layers/attn/o      [L, N, H, D]  (layers, heads, head_dim, embed)   + o_bias [L, D]
    (the biases of ``cfg.biased_projections``: all four with ``attention_bias``)
    layers/mlp_norm/scale  [L, D]
    layers/mlp/gate, up [L, D, F]    (layers, embed, mlp)  + gate_bias, up_bias [L, F]
    layers/mlp/down    [L, F, D]     (layers, mlp, embed)  + down_bias [L, D]
    final_norm/scale   [D]
    lm_head            [D, V]        (embed, vocab); absent when tie_word_embeddings
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
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
    transpose_rule,
)
from jaxarith.models.layers import RopeScaling, dense, lookup, rms_norm, rope, rope_inv_freq
from jaxarith.models.remat import (
    KEY_PROJ,
    MLPWI_0,
    MLPWI_1,
    MLPWO,
    OUT_PROJ,
    QUERY_PROJ,
    VALUE_PROJ,
)

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Llama 1/2/3.x (and Mistral-style dense) decoder configuration (HF names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Mistral: every layer attends only the ``sliding_window`` slots up to the query (None:
    # global). transformers' Llama ignores the key, and so does ``from_hf`` for ``llama``.
    sliding_window: int | None = None
    model_type: str = "llama"
    hf_extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    arch: ClassVar[Arch] = Arch.LLAMA
    HF_KEYS_READ: ClassVar[frozenset[str]] = frozenset({
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
        "mlp_bias", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
        "hidden_act", "sliding_window",
    })
    # HF keys of Llama 1/2/3.x and Mistral configs that change nothing in inference here.
    HF_KEYS_IGNORED: ClassVar[frozenset[str]] = frozenset({
        "attention_dropout", "pretraining_tp", "max_sequence_length", "rope_interleaved",
        "use_sliding_window", "max_window_layers", "layer_types",
    })

    def __post_init__(self):
        check_positive(self, ("vocab_size", "hidden_size", "intermediate_size",
                              "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                              "head_dim"))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ConfigError(f"sliding_window={self.sliding_window!r} must be a positive "
                              f"integer or null")

    @classmethod
    def check_keys(cls, d: dict[str, Any], where: str = "config") -> None:
        """Raise :class:`ConfigError` naming any key of ``d`` this family does not know."""
        check_hf_keys(cls, d, where)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        cls.check_keys(d)
        d = dict(d)
        heads = require(d, "num_attention_heads")
        hidden = require(d, "hidden_size")
        window = d.get("sliding_window") if d.get("model_type") == "mistral" else None
        theta, scaling = RopeScaling.from_hf(d)
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported for {cls.arch} "
                              f"(expected 'silu')")
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=require(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=require(d, "intermediate_size"),
            num_hidden_layers=require(d, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
            sliding_window=window or None,  # transformers: 0 or null is no window
            model_type=d.get("model_type", "llama"),
            hf_extra=d,
        )

    def to_hf(self) -> dict[str, Any]:
        d = dict(self.hf_extra)
        for key in ("rope_parameters", "rope_scaling", "rope_theta"):
            d.pop(key, None)
        d.update(
            model_type=self.model_type,
            architectures=d.get("architectures")
            or ["MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            hidden_act="silu",
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling.to_hf(),
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        return d

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @property
    def biased_projections(self) -> tuple[str, ...]:
        """The attention projections that carry a bias: q, k, v and o with ``attention_bias``,
        else none (a family may choose its own set, e.g. Qwen2's q, k and v)."""
        return ("q", "k", "v", "o") if self.attention_bias else ()


# ----------------------------------------------------------------------------- parameters


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
    bias_specs = {
        "q": ParamSpec((L, N, H), ("layers", "heads", "head_dim"), "zeros"),
        "k": ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros"),
        "v": ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros"),
        "o": ParamSpec((L, D), ("layers", "norm"), "zeros"),
    }
    attn |= {f"{name}_bias": bias_specs[name] for name in cfg.biased_projections}
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


# ----------------------------------------------------------------------------- forward


def embed(cfg: LlamaConfig, params: dict, inputs: Inputs) -> jax.Array:
    """Token embeddings [B, T, D] (positions enter through RoPE in the blocks)."""
    return lookup(params["embed"], inputs.tokens)


def head(cfg: LlamaConfig, params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array, bool]:
    """The output head's input and weight: (final-normed x, weight, weight is [V, D])."""
    x = rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps)
    if cfg.tie_word_embeddings:
        return x, params["embed"], True
    return x, params["lm_head"], False


def unembed(cfg: LlamaConfig, params: dict, x: jax.Array) -> jax.Array:
    h, w, vocab_major = head(cfg, params, x)
    return dense(h, w, w_transposed=vocab_major)


def _bias(p: dict, name: str, y: jax.Array) -> jax.Array:
    return y + p[name].astype(y.dtype) if name in p else y


@functools.lru_cache(maxsize=64)
def _inv_freq(cfg: LlamaConfig):
    return rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)


def self_attention(cfg: LlamaConfig, p: dict, x: jax.Array, ctx: BlockContext) -> jax.Array:
    """The attention branch [B, T, D]: RMSNorm, q/k/v projections (biases and per-head q/k
    norms when the layer has them), RoPE, attention, output."""
    a = p["attn"]
    inv_freq = jnp.asarray(_inv_freq(cfg))
    h = rms_norm(x, p["attn_norm"]["scale"], cfg.rms_norm_eps)
    # tagged for the remat policies (jaxarith.models.remat); checkpoint_name is the identity
    q = checkpoint_name(_bias(a, "q_bias", dense(h, a["q"])), QUERY_PROJ)
    k = checkpoint_name(_bias(a, "k_bias", dense(h, a["k"])), KEY_PROJ)
    v = checkpoint_name(_bias(a, "v_bias", dense(h, a["v"])), VALUE_PROJ)
    if "q_norm" in a:  # per-head RMSNorm of queries and keys before RoPE (Qwen3's QK-norm)
        q = rms_norm(q, a["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, a["k_norm"], cfg.rms_norm_eps)
    q, k = rope(q, ctx.positions, inv_freq), rope(k, ctx.positions, inv_freq)
    out = ctx.attention(q, k, v, scale=cfg.head_dim**-0.5)
    return checkpoint_name(_bias(a, "o_bias", dense(out, a["o"], 2)), OUT_PROJ)


def mlp(cfg: LlamaConfig, p: dict, x: jax.Array) -> jax.Array:
    """The MLP branch [B, T, D]: RMSNorm, SwiGLU."""
    m = p["mlp"]
    h = rms_norm(x, p["mlp_norm"]["scale"], cfg.rms_norm_eps)
    gate = checkpoint_name(_bias(m, "gate_bias", dense(h, m["gate"])), MLPWI_0)
    up = checkpoint_name(_bias(m, "up_bias", dense(h, m["up"])), MLPWI_1)
    down = dense(jax.nn.silu(gate) * up, m["down"])
    return checkpoint_name(_bias(m, "down_bias", down), MLPWO)


def block(cfg: LlamaConfig, p: dict, x: jax.Array, ctx: BlockContext) -> jax.Array:
    """One pre-norm block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""
    x = x + self_attention(cfg, p, x, ctx)
    return x + mlp(cfg, p, x)


# ----------------------------------------------------------------------------- HF conversion


def attention_windows(cfg: LlamaConfig) -> tuple[int | None, ...] | None:
    """Mistral's window on every layer (None: global attention)."""
    if cfg.sliding_window is None:
        return None
    return (cfg.sliding_window,) * cfg.num_hidden_layers


def hf_rules(cfg: LlamaConfig) -> list[Rule]:
    """HF ``LlamaForCausalLM`` tensors (``nn.Linear`` weights stored ``[out, in]``)."""
    D, N, K, H, F, V = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                        cfg.head_dim, cfg.intermediate_size, cfg.vocab_size)
    p = "model.layers.{i}."
    L = ("layers",)

    def proj_in(n):  # nn.Linear [n*H, D] <-> [D, n, H]
        return (lambda w: (w.T.reshape(D, n, H),)), (lambda c: c.reshape(D, n * H).T)

    rules = [
        copy_rule("model.embed_tokens.weight", ("embed",), (V, D)),
        copy_rule("model.norm.weight", ("final_norm", "scale"), (D,)),
        copy_rule(p + "input_layernorm.weight", L + ("attn_norm", "scale"), (D,)),
        copy_rule(p + "post_attention_layernorm.weight", L + ("mlp_norm", "scale"), (D,)),
    ]
    for name, n in (("q", N), ("k", K), ("v", K)):
        fwd, back = proj_in(n)
        rules.append(Rule(p + f"self_attn.{name}_proj.weight", (L + ("attn", name),), (n * H, D),
                          fwd, back))
        if name in cfg.biased_projections:
            rules.append(Rule(p + f"self_attn.{name}_proj.bias", (L + ("attn", f"{name}_bias"),),
                              (n * H,), lambda b, n=n: (b.reshape(n, H),),
                              lambda c, n=n: c.reshape(n * H)))
    rules.append(Rule(p + "self_attn.o_proj.weight", (L + ("attn", "o"),), (D, N * H),
                      lambda w: (w.T.reshape(N, H, D),), lambda c: c.reshape(N * H, D).T))
    if "o" in cfg.biased_projections:
        rules.append(copy_rule(p + "self_attn.o_proj.bias", L + ("attn", "o_bias"), (D,)))
    for name, shape in (("gate", (F, D)), ("up", (F, D)), ("down", (D, F))):
        rules.append(transpose_rule(p + f"mlp.{name}_proj.weight", L + ("mlp", name), shape))
        if cfg.mlp_bias:
            rules.append(copy_rule(p + f"mlp.{name}_proj.bias", L + ("mlp", f"{name}_bias"),
                                   (shape[0],)))
    if not cfg.tie_word_embeddings:
        rules.append(transpose_rule("lm_head.weight", ("lm_head",), (V, D)))
    return rules


FAMILY = Family(
    arch=Arch.LLAMA,
    config_class=LlamaConfig,
    # Mistral's dense configs are Llama-shaped, with a sliding window.
    model_types=("llama", "mistral"),
    param_specs=param_specs,
    embed=embed,
    block=block,
    unembed=unembed,
    head=head,
    hf_rules=hf_rules,
    hf_buffers=("rotary_emb.inv_freq",),
    attention_windows=attention_windows,
    upcycles_to="mixtral",
)
