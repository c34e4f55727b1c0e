"""Gemma 2 family (HF ``model_type: gemma2``): config, parameter table, block, HF rules.

What differs from Llama (``llama.py``):

- embeddings scaled by ``sqrt(hidden_size)``, the factor rounded to the compute dtype first, as
  transformers does (``embed_scale.to(weight.dtype)``);
- RMSNorm scales by ``1 + w`` and computes in float32 before casting back (``w`` is stored
  zero-centred, so its init is zeros);
- four norms per block: pre- and post-norms around attention and around the MLP;
- GeGLU MLP with tanh-approximated GELU (``hidden_activation: gelu_pytorch_tanh``);
- attention scores scaled by ``query_pre_attn_scalar ** -0.5`` and soft-capped
  (``attn_logit_softcapping``), final logits soft-capped (``final_logit_softcapping``);
- sliding-window layers (``sliding_window``) alternating with global ones, by ``layer_types``
  (transformers 5.x) or the older rule (even layers local); the driver applies the windows
  (``Family.attention_windows``).

Canonical tree (Llama's names; the post-norms are extra)::

    embed                       [V, D]        (vocab, embed)   tied output head by default
    layers/attn_norm/scale      [L, D]        input_layernorm
    layers/attn/q               [L, D, N, H]
    layers/attn/k, v            [L, D, K, H]
    layers/attn/o               [L, N, H, D]
    layers/attn_post_norm/scale [L, D]        post_attention_layernorm
    layers/mlp_norm/scale       [L, D]        pre_feedforward_layernorm
    layers/mlp/gate, up         [L, D, F]
    layers/mlp/down             [L, F, D]
    layers/mlp_post_norm/scale  [L, D]        post_feedforward_layernorm
    final_norm/scale            [D]
    lm_head                     [D, V]        only when tie_word_embeddings is false

Gemma 3 (``gemma3.py``) adds q/k norms and per-layer-type RoPE on the same tree.
"""

from __future__ import annotations

import dataclasses
import functools
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
    transpose_rule,
)
from jaxarith.models.layers import (
    RopeScaling,
    dense,
    lookup,
    rope,
    rope_inv_freq,
    soft_cap,
)
from jaxarith.models.remat import (
    KEY_PROJ,
    MLPWI_0,
    MLPWI_1,
    MLPWO,
    OUT_PROJ,
    QUERY_PROJ,
    VALUE_PROJ,
)

SLIDING = "sliding_attention"
FULL = "full_attention"
# HF activation names -> whether GELU is the tanh approximation
ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu": False}

# ----------------------------------------------------------------------------- config


def default_layer_types(n: int, pattern: int) -> tuple[str, ...]:
    """transformers' rule: every ``pattern``-th layer (1-based) is global, the others local
    (Gemma 2: pattern 2, even layers local; Gemma 3: ``sliding_window_pattern``, default 6)."""
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma2Config:
    """Gemma 2 decoder configuration (HF names).

    Attributes:
      layer_types: per layer, ``sliding_attention`` (a window of ``sliding_window`` slots) or
        ``full_attention``.
      sliding_window_pattern: the period of the default ``layer_types`` (used to extend them
        when the depth changes, e.g. layer inheritance).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] = ()
    sliding_window_pattern: int = 2
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    gelu_tanh: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    model_type: str = "gemma2"
    hf_extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    arch: ClassVar[Arch] = Arch.GEMMA2
    HF_KEYS_READ: ClassVar[frozenset[str]] = frozenset({
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
        "query_pre_attn_scalar", "sliding_window", "layer_types", "attn_logit_softcapping",
        "final_logit_softcapping", "hidden_activation", "tie_word_embeddings", "bos_token_id",
        "eos_token_id", "pad_token_id", "use_bidirectional_attention",
    })
    # Keys of published Gemma 2 configs that transformers 5 does not read (``hidden_act`` is
    # Gemma 1's name; Gemma 2 reads ``hidden_activation``), or that change nothing here.
    HF_KEYS_IGNORED: ClassVar[frozenset[str]] = frozenset({
        "attention_dropout", "hidden_act", "cache_implementation", "sliding_window_size",
        "sliding_window_pattern",
    })

    def __post_init__(self):
        check_positive(self, ("vocab_size", "hidden_size", "intermediate_size",
                              "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                              "head_dim", "sliding_window_pattern"))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                              f"of num_key_value_heads={self.num_key_value_heads}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for "
                              f"num_hidden_layers={self.num_hidden_layers}")
        bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
        if bad:
            raise ConfigError(f"layer_types: {bad} not supported (expected {SLIDING!r} or "
                              f"{FULL!r})")
        if SLIDING in self.layer_types and (not isinstance(self.sliding_window, int)
                                            or self.sliding_window < 1):
            raise ConfigError(f"sliding_window={self.sliding_window!r} must be a positive "
                              f"integer when layer_types has {SLIDING!r} layers")
        if self.query_pre_attn_scalar <= 0:
            raise ConfigError(f"query_pre_attn_scalar={self.query_pre_attn_scalar} must be > 0")
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            cap = getattr(self, name)
            if cap is not None and cap <= 0:
                raise ConfigError(f"{name}={cap} must be > 0 or null")

    @classmethod
    def check_keys(cls, d: dict[str, Any], where: str = "config") -> None:
        """Raise :class:`ConfigError` naming any key of ``d`` this family does not know."""
        check_hf_keys(cls, d, where)

    @classmethod
    def _common_from_hf(cls, d: dict[str, Any], pattern: int) -> dict[str, Any]:
        """The fields Gemma 2 and 3 read alike, after the key check."""
        cls.check_keys(d)
        if d.get("attention_bias"):
            raise ConfigError("attention_bias=true is not supported for gemma (no published "
                              "Gemma has attention biases)")
        if d.get("use_bidirectional_attention"):
            raise ConfigError("use_bidirectional_attention=true is not supported (jaxarith's "
                              "decoders are causal)")
        act = d.get("hidden_activation", "gelu_pytorch_tanh")
        if act not in ACTIVATIONS:
            raise ConfigError(f"hidden_activation={act!r} is not supported for "
                              f"{d.get('model_type')} (expected one of {sorted(ACTIVATIONS)})")
        heads = require(d, "num_attention_heads")
        hidden = require(d, "hidden_size")
        layers = require(d, "num_hidden_layers")
        types = d.get("layer_types")
        eos = d.get("eos_token_id", 1)  # transformers' Gemma token defaults: bos 2, eos 1, pad 0
        return dict(
            vocab_size=require(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=require(d, "intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            max_position_embeddings=d.get(  # transformers' default differs by family
                "max_position_embeddings", cls.__dataclass_fields__[
                    "max_position_embeddings"].default),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
            sliding_window=d.get("sliding_window", 4096),  # transformers' default
            layer_types=tuple(types) if types else default_layer_types(layers, pattern),
            sliding_window_pattern=pattern,
            gelu_tanh=ACTIVATIONS[act],
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            bos_token_id=d.get("bos_token_id", 2),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id", 0),
            model_type=d.get("model_type", cls.arch.value),
            hf_extra=d,
        )

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Gemma2Config:
        kw = cls._common_from_hf(d, 2)
        theta, scaling = RopeScaling.from_hf(d)
        return cls(**kw, rope_theta=theta, rope_scaling=scaling,
                   attn_logit_softcapping=d.get("attn_logit_softcapping", 50.0),
                   final_logit_softcapping=d.get("final_logit_softcapping", 30.0))

    def _common_to_hf(self) -> dict[str, Any]:
        d = dict(self.hf_extra)
        for key in ("rope_parameters", "rope_scaling", "rope_theta", "hidden_act"):
            d.pop(key, None)
        act = d.get("hidden_activation")  # kept when it names the same function
        if ACTIVATIONS.get(act) != self.gelu_tanh:
            act = "gelu_pytorch_tanh" if self.gelu_tanh else "gelu"
        d.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            hidden_activation=act,
            query_pre_attn_scalar=self.query_pre_attn_scalar,
            sliding_window=self.sliding_window,
            layer_types=list(self.layer_types),
            attn_logit_softcapping=self.attn_logit_softcapping,
            final_logit_softcapping=self.final_logit_softcapping,
            attention_bias=False,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        return d

    def to_hf(self) -> dict[str, Any]:
        d = self._common_to_hf()
        d.update(architectures=d.get("architectures") or ["Gemma2ForCausalLM"],
                 rope_theta=self.rope_theta, rope_scaling=self.rope_scaling.to_hf())
        return d

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings


def with_depth(cfg: Gemma2Config, n: int) -> Gemma2Config:
    """``cfg`` with ``n`` layers: the layer types of the first ``n`` layers, extended by the
    config's pattern when it grows (a custom ``layer_types`` list cannot be extended)."""
    types = cfg.layer_types
    if n <= len(types):
        types = types[:n]
    elif types == default_layer_types(len(types), cfg.sliding_window_pattern):
        types = default_layer_types(n, cfg.sliding_window_pattern)
    else:
        raise ConfigError(f"{n} layers: the model's layer_types do not follow a pattern that "
                          f"extends past its {len(types)} layers")
    extra = dict(cfg.hf_extra, num_hidden_layers=n)
    extra.pop("layer_types", None)
    return dataclasses.replace(cfg, num_hidden_layers=n, layer_types=types, hf_extra=extra)


def depth_sensitive(cfg: Gemma2Config) -> str | None:
    if len(set(cfg.layer_types)) > 1:
        return ("layer_types: Gemma's layers alternate sliding-window and global attention by "
                "depth")
    return None


def attention_windows(cfg: Gemma2Config) -> tuple[int | None, ...]:
    """``sliding_window`` on the ``sliding_attention`` layers, None (global) on the others."""
    return tuple(cfg.sliding_window if t == SLIDING else None for t in cfg.layer_types)


# ----------------------------------------------------------------------------- parameters


def param_specs(cfg: Gemma2Config) -> dict:
    L, D, N, K, H, F, V = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                           cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size,
                           cfg.vocab_size)

    def norm():  # stored w of the (1 + w) scale: zero-centred
        return {"scale": ParamSpec((L, D), ("layers", "norm"), "zeros")}

    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed")),
        "layers": {
            "attn_norm": norm(),
            "attn": {
                "q": ParamSpec((L, D, N, H), ("layers", "embed", "heads", "head_dim")),
                "k": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
                "v": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
                "o": ParamSpec((L, N, H, D), ("layers", "heads", "head_dim", "embed")),
            },
            "attn_post_norm": norm(),
            "mlp_norm": norm(),
            "mlp": {
                "gate": ParamSpec((L, D, F), ("layers", "embed", "mlp")),
                "up": ParamSpec((L, D, F), ("layers", "embed", "mlp")),
                "down": ParamSpec((L, F, D), ("layers", "mlp", "embed")),
            },
            "mlp_post_norm": norm(),
        },
        "final_norm": {"scale": ParamSpec((D,), ("norm",), "zeros")},
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
    return specs


# ----------------------------------------------------------------------------- forward


def gemma_rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """HF GemmaRMSNorm: normalise and scale by ``1 + w`` in float32, then cast back."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def embed(cfg: Gemma2Config, params: dict, inputs: Inputs) -> jax.Array:
    """Token embeddings [B, T, D] times ``sqrt(D)`` rounded to the compute dtype."""
    table = params["embed"]
    dtype = table.dtype if inputs.dtype is None else inputs.dtype
    x = lookup(table, inputs.tokens).astype(dtype)
    return x * jnp.asarray(np.float32(cfg.hidden_size ** 0.5), dtype)


def head(cfg: Gemma2Config, params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array, bool]:
    """The output head's input and weight: (final-normed x, weight, weight is [V, D]); the
    logits are ``dense(h, w)`` soft-capped by ``final_logit_softcapping`` (see ``unembed``)."""
    x = gemma_rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps)
    if cfg.tie_word_embeddings:
        return x, params["embed"], True
    return x, params["lm_head"], False


def unembed(cfg: Gemma2Config, params: dict, x: jax.Array) -> jax.Array:
    h, w, vocab_major = head(cfg, params, x)
    return soft_cap(dense(h, w, w_transposed=vocab_major), cfg.final_logit_softcapping)


def logit_softcap(cfg: Gemma2Config) -> float | None:
    return cfg.final_logit_softcapping


@functools.lru_cache(maxsize=64)
def _inv_freq(cfg: Gemma2Config) -> np.ndarray:
    return rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)


def attention(cfg: Gemma2Config, p: dict, x: jax.Array, ctx: BlockContext,
              inv_freq: jax.Array, qk_norm: bool = False) -> jax.Array:
    """The attention branch [B, T, D] before its post-norm: q/k/v projections (q/k RMSNorm
    over the head dim when ``qk_norm``, Gemma 3), RoPE, soft-capped attention, output."""
    a = p["attn"]
    # [B, T, N|K, H]; tagged for the remat policies (checkpoint_name is the identity)
    q = checkpoint_name(dense(x, a["q"]), QUERY_PROJ)
    k = checkpoint_name(dense(x, a["k"]), KEY_PROJ)
    v = checkpoint_name(dense(x, a["v"]), VALUE_PROJ)
    if qk_norm:
        q = gemma_rms_norm(q, a["q_norm"], cfg.rms_norm_eps)
        k = gemma_rms_norm(k, a["k_norm"], cfg.rms_norm_eps)
    q, k = rope(q, ctx.positions, inv_freq), rope(k, ctx.positions, inv_freq)
    out = ctx.attention(q, k, v, scale=float(cfg.query_pre_attn_scalar) ** -0.5,
                        softcap=cfg.attn_logit_softcapping)
    return checkpoint_name(dense(out, a["o"], 2), OUT_PROJ)


def mlp(cfg: Gemma2Config, p: dict, x: jax.Array) -> jax.Array:
    """GeGLU: ``down(gelu(gate(x)) * up(x))``."""
    m = p["mlp"]
    gate = jax.nn.gelu(checkpoint_name(dense(x, m["gate"]), MLPWI_0), approximate=cfg.gelu_tanh)
    up = checkpoint_name(dense(x, m["up"]), MLPWI_1)
    return checkpoint_name(dense(gate * up, m["down"]), MLPWO)


def sandwich(cfg: Gemma2Config, p: dict, x: jax.Array, ctx: BlockContext,
             attn_out) -> jax.Array:
    """One Gemma block around an attention branch ``attn_out(h) -> [B, T, D]``:
    ``x + post_norm(attn(norm(x)))``, then ``x + post_norm(mlp(norm(x)))``."""
    eps = cfg.rms_norm_eps
    h = gemma_rms_norm(x, p["attn_norm"]["scale"], eps)
    x = x + gemma_rms_norm(attn_out(h), p["attn_post_norm"]["scale"], eps)
    h = gemma_rms_norm(x, p["mlp_norm"]["scale"], eps)
    return x + gemma_rms_norm(mlp(cfg, p, h), p["mlp_post_norm"]["scale"], eps)


def block(cfg: Gemma2Config, p: dict, x: jax.Array, ctx: BlockContext) -> jax.Array:
    inv_freq = jnp.asarray(_inv_freq(cfg))
    return sandwich(cfg, p, x, ctx, lambda h: attention(cfg, p, h, ctx, inv_freq))


# ----------------------------------------------------------------------------- HF conversion


def hf_rules(cfg: Gemma2Config) -> list[Rule]:
    """HF ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` tensors (``nn.Linear`` ``[out, in]``)."""
    D, N, K, H, F, V = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                        cfg.head_dim, cfg.intermediate_size, cfg.vocab_size)
    p = "model.layers.{i}."
    L = ("layers",)
    rules = [
        copy_rule("model.embed_tokens.weight", ("embed",), (V, D)),
        copy_rule("model.norm.weight", ("final_norm", "scale"), (D,)),
    ]
    for hf, ours in (("input_layernorm", "attn_norm"), ("post_attention_layernorm",
                     "attn_post_norm"), ("pre_feedforward_layernorm", "mlp_norm"),
                     ("post_feedforward_layernorm", "mlp_post_norm")):
        rules.append(copy_rule(p + f"{hf}.weight", L + (ours, "scale"), (D,)))
    for name, n in (("q", N), ("k", K), ("v", K)):  # [n*H, D] <-> [D, n, H]
        rules.append(Rule(p + f"self_attn.{name}_proj.weight", (L + ("attn", name),),
                          (n * H, D), lambda w, n=n: (w.T.reshape(D, n, H),),
                          lambda c, n=n: c.reshape(D, n * H).T))
    rules.append(Rule(p + "self_attn.o_proj.weight", (L + ("attn", "o"),), (D, N * H),
                      lambda w: (w.T.reshape(N, H, D),), lambda c: c.reshape(N * H, D).T))
    for name, shape in (("gate", (F, D)), ("up", (F, D)), ("down", (D, F))):
        rules.append(transpose_rule(p + f"mlp.{name}_proj.weight", L + ("mlp", name), shape))
    if not cfg.tie_word_embeddings:
        rules.append(transpose_rule("lm_head.weight", ("lm_head",), (V, D)))
    return rules


FAMILY = Family(
    arch=Arch.GEMMA2,
    config_class=Gemma2Config,
    model_types=("gemma2",),
    param_specs=param_specs,
    embed=embed,
    block=block,
    unembed=unembed,
    head=head,
    hf_rules=hf_rules,
    hf_buffers=("rotary_emb.inv_freq", "embed_tokens.embed_scale"),
    attention_windows=attention_windows,
    logit_softcap=logit_softcap,
    with_depth=with_depth,
    depth_sensitive=depth_sensitive,
)
