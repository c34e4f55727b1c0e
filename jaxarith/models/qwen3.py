"""Qwen3 family (HF ``model_type: qwen3``): a Llama with per-head RMSNorm on queries and keys.

The tree is Llama's (see ``llama.py``) plus two per-head norm scales::

    layers/attn/q_norm [L, H]  (layers, head_dim)   HF self_attn.q_norm.weight
    layers/attn/k_norm [L, H]  (layers, head_dim)   HF self_attn.k_norm.weight

applied to each head's H features after the q/k projections and before RoPE (HF's
``Qwen3Attention``; :func:`jaxarith.models.llama.self_attention` applies them when the layer has
them). ``head_dim`` is explicit in Qwen3 configs (128 while ``hidden_size / heads`` may be 80 or
160); ``attention_bias`` puts biases on q, k, v and o as in Llama. Sliding windows are refused as
for Qwen2 (:func:`jaxarith.models.qwen2.check_no_sliding_window`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from jaxarith.errors import ConfigError
from jaxarith.models import llama
from jaxarith.models.family import Arch, Family, ParamSpec, Rule, copy_rule
from jaxarith.models.qwen2 import SLIDING_WINDOW_KEYS, check_no_sliding_window


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen3Config(llama.LlamaConfig):
    """Qwen3 decoder configuration (HF names): Llama's fields; no MLP biases."""

    rms_norm_eps: float = 1e-6
    model_type: str = "qwen3"

    arch: ClassVar[Arch] = Arch.QWEN3
    HF_KEYS_READ: ClassVar[frozenset[str]] = (
        llama.LlamaConfig.HF_KEYS_READ - {"mlp_bias"}) | SLIDING_WINDOW_KEYS
    HF_KEYS_IGNORED: ClassVar[frozenset[str]] = frozenset({"attention_dropout"})

    def __post_init__(self):
        super().__post_init__()
        if self.mlp_bias:
            raise ConfigError(f"{self.model_type} has no MLP biases (mlp_bias must be false)")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Qwen3Config:
        cls.check_keys(d)
        check_no_sliding_window(d, str(cls.arch))
        return super().from_hf(d)

    def to_hf(self) -> dict[str, Any]:
        d = super().to_hf()
        d.pop("mlp_bias", None)
        d.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
        return d


def qk_norm_specs(cfg: llama.LlamaConfig) -> dict[str, ParamSpec]:
    """The per-head query and key norm scales ``[L, H]`` (ones at init)."""
    L, H = cfg.num_hidden_layers, cfg.head_dim
    return {name: ParamSpec((L, H), ("layers", "head_dim"), "ones")
            for name in ("q_norm", "k_norm")}


def qk_norm_rules(cfg: llama.LlamaConfig) -> list[Rule]:
    return [copy_rule(f"model.layers.{{i}}.self_attn.{name}.weight", ("layers", "attn", name),
                      (cfg.head_dim,)) for name in ("q_norm", "k_norm")]


def param_specs(cfg: Qwen3Config) -> dict:
    specs = llama.param_specs(cfg)
    specs["layers"]["attn"] |= qk_norm_specs(cfg)
    return specs


def hf_rules(cfg: Qwen3Config) -> list[Rule]:
    """HF ``Qwen3ForCausalLM`` tensors: Llama's plus ``self_attn.q_norm`` / ``k_norm``."""
    return llama.hf_rules(cfg) + qk_norm_rules(cfg)


FAMILY = Family(
    arch=Arch.QWEN3,
    config_class=Qwen3Config,
    model_types=("qwen3",),
    param_specs=param_specs,
    embed=llama.embed,
    block=llama.block,
    unembed=llama.unembed,
    head=llama.head,
    hf_rules=hf_rules,
    hf_buffers=("rotary_emb.inv_freq",),
)
