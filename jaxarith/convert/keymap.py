"""HF tensor names <-> canonical paths, one table per architecture: a name map plus value hooks.

Each :class:`Rule` ties one HF tensor (``{i}`` = layer index) to one or more canonical leaves and
gives the two value hooks: ``to_canon`` (HF array -> canonical per-layer arrays) and ``to_hf`` (the
inverse). Hooks only transpose, reshape, split and concatenate, so a round trip is bit-exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxarith.models.config import Arch, ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    hf_key: str
    targets: tuple[Path, ...]
    hf_shape: tuple[int, ...]
    to_canon: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_key


def _same(x):
    return (x,)


def _ident(x):
    return x


def _t(x):
    return (x.T,)


def _untr(x):
    return x.T


def llama_rules(cfg) -> list[Rule]:
    D, N, K, H, F, V = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                        cfg.head_dim, cfg.intermediate_size, cfg.vocab_size)
    p = "model.layers.{i}."
    L = ("layers",)

    def proj_in(n):  # nn.Linear [n*H, D] <-> [D, n, H]
        return (lambda w: (w.T.reshape(D, n, H),)), (lambda c: c.reshape(D, n * H).T)

    rules = [
        Rule("model.embed_tokens.weight", (("embed",),), (V, D), _same, _ident),
        Rule("model.norm.weight", (("final_norm", "scale"),), (D,), _same, _ident),
        Rule(p + "input_layernorm.weight", (L + ("attn_norm", "scale"),), (D,), _same, _ident),
        Rule(p + "post_attention_layernorm.weight", (L + ("mlp_norm", "scale"),), (D,), _same,
             _ident),
    ]
    for name, n in (("q", N), ("k", K), ("v", K)):
        fwd, back = proj_in(n)
        rules.append(Rule(p + f"self_attn.{name}_proj.weight", (L + ("attn", name),), (n * H, D),
                          fwd, back))
        if cfg.attention_bias:
            rules.append(Rule(p + f"self_attn.{name}_proj.bias", (L + ("attn", f"{name}_bias"),),
                              (n * H,), lambda b, n=n: (b.reshape(n, H),),
                              lambda c, n=n: c.reshape(n * H)))
    rules.append(Rule(p + "self_attn.o_proj.weight", (L + ("attn", "o"),), (D, N * H),
                      lambda w: (w.T.reshape(N, H, D),), lambda c: c.reshape(N * H, D).T))
    if cfg.attention_bias:
        rules.append(Rule(p + "self_attn.o_proj.bias", (L + ("attn", "o_bias"),), (D,), _same,
                          _ident))
    for name, shape in (("gate", (F, D)), ("up", (F, D)), ("down", (D, F))):
        rules.append(Rule(p + f"mlp.{name}_proj.weight", (L + ("mlp", name),), shape, _t, _untr))
        if cfg.mlp_bias:
            rules.append(Rule(p + f"mlp.{name}_proj.bias", (L + ("mlp", f"{name}_bias"),),
                              (shape[0],), _same, _ident))
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", (("lm_head",),), (V, D), _t, _untr))
    return rules


def gpt2_rules(cfg) -> list[Rule]:
    D, N, H, F, V, P = (cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.intermediate_size,
                        cfg.vocab_size, cfg.n_positions)
    p = "transformer.h.{i}."
    L = ("layers",)

    def norm(hf, canon, shape, layer):
        base = L if layer else ()
        return [Rule(hf + ".weight", (base + (canon, "scale"),), shape, _same, _ident),
                Rule(hf + ".bias", (base + (canon, "bias"),), shape, _same, _ident)]

    qkv = tuple(L + ("attn", n) for n in "qkv")
    qkv_b = tuple(L + ("attn", f"{n}_bias") for n in "qkv")
    return [
        Rule("transformer.wte.weight", (("embed",),), (V, D), _same, _ident),
        Rule("transformer.wpe.weight", (("pos_embed",),), (P, D), _same, _ident),
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
        Rule(p + "attn.c_proj.bias", (L + ("attn", "o_bias"),), (D,), _same, _ident),
        Rule(p + "mlp.c_fc.weight", (L + ("mlp", "up"),), (D, F), _same, _ident),
        Rule(p + "mlp.c_fc.bias", (L + ("mlp", "up_bias"),), (F,), _same, _ident),
        Rule(p + "mlp.c_proj.weight", (L + ("mlp", "down"),), (F, D), _same, _ident),
        Rule(p + "mlp.c_proj.bias", (L + ("mlp", "down_bias"),), (D,), _same, _ident),
    ]


def rules_for(cfg: ModelConfig) -> list[Rule]:
    return llama_rules(cfg) if cfg.arch is Arch.LLAMA else gpt2_rules(cfg)


def ignorable(cfg: ModelConfig, key: str) -> bool:
    """HF tensors that carry no parameters of ours (buffers, a saved copy of a tied head)."""
    if key.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
        return True
    return key == "lm_head.weight" and cfg.tie_word_embeddings


def normalize_key(cfg: ModelConfig, key: str) -> str:
    """Original GPT-2 checkpoints name tensors without the ``transformer.`` prefix."""
    if cfg.arch is Arch.GPT2 and not key.startswith(("transformer.", "lm_head.")):
        return "transformer." + key
    return key


def expand(rule: Rule, num_layers: int) -> list[tuple[str, int | None]]:
    """(hf key, layer index) for every HF tensor a rule covers."""
    if not rule.per_layer:
        return [(rule.hf_key, None)]
    return [(rule.hf_key.format(i=i), i) for i in range(num_layers)]
