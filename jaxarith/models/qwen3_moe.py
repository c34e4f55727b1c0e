"""Qwen3-MoE family (HF ``model_type: qwen3_moe``): Qwen3 attention, a sparse mixture of experts.

The tree is Qwen3's (see ``qwen3.py``) with ``layers/mlp`` replaced by Mixtral's ``layers/moe``
(:func:`jaxarith.models.moe.expert_specs`, experts of width ``moe_intermediate_size`` on the
``experts`` logical axis, sharded over the ``expert`` mesh axis)::

    layers/moe/router  [L, D, E]     (layers, embed, None)          HF mlp.gate.weight
    layers/moe/gate, up [L, E, D, F] (layers, experts, embed, mlp)  HF mlp.experts.{j}.gate_proj
                                                                     / up_proj
    layers/moe/down    [L, E, F, D]  (layers, experts, mlp, embed)  HF mlp.experts.{j}.down_proj

Routing is Mixtral's (:mod:`jaxarith.models.moe`: float32 softmax over the E experts, top k)
with ``norm_topk_prob`` choosing whether the k kept probabilities are renormalised (True, as
Qwen3-30B-A3B) or used as they are (False, transformers' default). The training program adds the
load-balancing loss at ``router_aux_loss_coef`` (``Family.routed``).

Only the common layout is implemented: every layer sparse (``decoder_sparse_step: 1`` and
``mlp_only_layers: []``, as in the released checkpoints); other values are refused naming the key.
Checkpoints come in two tensor layouts, one tensor per expert (as ``save_pretrained`` writes
them) or transformers 5's fused experts (``mlp.experts.gate_up_proj``), told apart as for
Mixtral (:func:`jaxarith.models.mixtral.checkpoint_layout`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from jaxarith.errors import ConfigError
from jaxarith.models import llama, mixtral, moe, qwen3
from jaxarith.models.family import Arch, BlockContext, Family, Rule, check_positive, require
from jaxarith.models.layers import rms_norm


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen3MoeConfig(qwen3.Qwen3Config):
    """Qwen3-MoE decoder configuration (HF names); Qwen3's fields plus the experts.

    Attributes:
      num_experts: E, experts per layer (HF ``num_experts``; transformers 5 writes it as
        ``num_local_experts``, which is read too).
      num_experts_per_tok: k, experts each token is routed to.
      moe_intermediate_size: F of each expert (``intermediate_size`` is HF's width of a dense
        MLP layer, which only ``mlp_only_layers`` would use: kept for the round trip).
      norm_topk_prob: renormalise the k kept routing probabilities to sum to 1.
      router_aux_loss_coef: weight of the load-balancing loss in training.
      moe_capacity_factor: jaxarith's own key (HF ignores it): 0 dropless (default), else the
        per-expert cap of :mod:`jaxarith.models.moe`.
    """

    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001
    moe_capacity_factor: float = 0.0
    model_type: str = "qwen3_moe"
    # the checkpoint's tensor layout (not a config.json key; see mixtral.checkpoint_layout)
    hf_fused_experts: bool = dataclasses.field(default=False, compare=False)

    arch: ClassVar[Arch] = Arch.QWEN3_MOE
    HF_KEYS_READ: ClassVar[frozenset[str]] = qwen3.Qwen3Config.HF_KEYS_READ | frozenset({
        "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
        "norm_topk_prob", "router_aux_loss_coef", "decoder_sparse_step", "mlp_only_layers",
        "moe_capacity_factor",
    })
    HF_KEYS_IGNORED: ClassVar[frozenset[str]] = qwen3.Qwen3Config.HF_KEYS_IGNORED | frozenset({
        "output_router_logits",
    })

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, ("num_experts", "num_experts_per_tok", "moe_intermediate_size"))
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
                              f"num_experts={self.num_experts}")
        if self.moe_capacity_factor < 0:
            raise ConfigError(f"moe_capacity_factor={self.moe_capacity_factor} must be >= 0")

    @property
    def num_local_experts(self) -> int:
        """E under the name the shared mixture-of-experts code reads (Mixtral's)."""
        return self.num_experts

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Qwen3MoeConfig:
        base = super().from_hf(d)  # checks the keys and sliding windows, reads Qwen3's fields
        experts = d.get("num_experts", d.get("num_local_experts"))
        if experts is None:
            raise ConfigError("config.json has no 'num_experts'")
        if "num_local_experts" in d and d["num_local_experts"] != experts:
            raise ConfigError(f"num_experts={experts} and num_local_experts="
                              f"{d['num_local_experts']} disagree")
        step = d.get("decoder_sparse_step", 1)
        if step != 1:
            raise ConfigError(f"decoder_sparse_step={step!r} is not supported: only every layer "
                              f"sparse (decoder_sparse_step=1) is implemented")
        dense_layers = d.get("mlp_only_layers") or []
        if dense_layers:
            raise ConfigError(f"mlp_only_layers={dense_layers!r} is not supported: only every "
                              f"layer sparse (mlp_only_layers=[]) is implemented")
        return dataclasses.replace(
            base,
            num_experts=experts,
            num_experts_per_tok=require(d, "num_experts_per_tok"),
            moe_intermediate_size=require(d, "moe_intermediate_size"),
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
            moe_capacity_factor=float(d.get("moe_capacity_factor", 0.0)),
        )

    def to_hf(self) -> dict[str, Any]:
        d = super().to_hf()
        # the experts under the key the source used (transformers 5 writes num_local_experts)
        key = "num_local_experts" if "num_local_experts" in d and "num_experts" not in d \
            else "num_experts"
        d.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                 num_experts_per_tok=self.num_experts_per_tok,
                 moe_intermediate_size=self.moe_intermediate_size,
                 norm_topk_prob=self.norm_topk_prob,
                 router_aux_loss_coef=self.router_aux_loss_coef,
                 decoder_sparse_step=1, mlp_only_layers=[])
        d[key] = self.num_experts
        if self.moe_capacity_factor:
            d["moe_capacity_factor"] = self.moe_capacity_factor
        else:
            d.pop("moe_capacity_factor", None)
        return d


def param_specs(cfg: Qwen3MoeConfig) -> dict:
    specs = qwen3.param_specs(cfg)
    del specs["layers"]["mlp"]
    specs["layers"]["moe"] = moe.expert_specs(cfg.num_hidden_layers, cfg.hidden_size,
                                              cfg.num_experts, cfg.moe_intermediate_size)
    return specs


def block(cfg: Qwen3MoeConfig, p: dict, x: jax.Array,
          ctx: BlockContext) -> tuple[jax.Array, jax.Array]:
    """One pre-norm block; returns (x, router logits [B, T, E] float32) for the router losses."""
    x = x + llama.self_attention(cfg, p, x, ctx)
    h = rms_norm(x, p["mlp_norm"]["scale"], cfg.rms_norm_eps)
    y, logits = moe.sparse_mlp(h, p["moe"], cfg.num_experts_per_tok,
                               normalize=cfg.norm_topk_prob,
                               capacity_factor=cfg.moe_capacity_factor)
    return x + y, logits


def hf_rules(cfg: Qwen3MoeConfig) -> list[Rule]:
    """HF ``Qwen3MoeForCausalLM`` tensors: Qwen3's attention, router ``mlp.gate.weight`` and the
    experts, one tensor per expert (``mlp.experts.{j}.gate_proj/up_proj/down_proj.weight``) or,
    with ``cfg.hf_fused_experts``, fused (``mlp.experts.gate_up_proj`` / ``down_proj``)."""
    rules = [r for r in qwen3.hf_rules(cfg) if ".mlp." not in r.hf_key]
    names = None if cfg.hf_fused_experts else ("gate_proj", "up_proj", "down_proj")
    return rules + moe.expert_rules("model.layers.{i}.mlp.", cfg.hidden_size, cfg.num_experts,
                                    cfg.moe_intermediate_size, names)


FAMILY = Family(
    arch=Arch.QWEN3_MOE,
    config_class=Qwen3MoeConfig,
    model_types=("qwen3_moe",),
    param_specs=param_specs,
    embed=llama.embed,
    block=block,
    unembed=llama.unembed,
    head=llama.head,
    hf_rules=hf_rules,
    hf_buffers=("rotary_emb.inv_freq",),
    routed=True,
    checkpoint_layout=mixtral.checkpoint_layout,
)
