"""Mixtral family (HF ``model_type: mixtral``): Llama attention, a sparse mixture-of-experts MLP.

The tree is Llama's (see ``llama.py``) with ``layers/mlp`` replaced by ``layers/moe``, the E
experts' SwiGLU weights stacked on an ``experts`` logical axis (sharded over the ``expert`` mesh
axis)::

    layers/moe/router  [L, D, E]     (layers, embed, None)          float32 routing
    layers/moe/gate, up [L, E, D, F] (layers, experts, embed, mlp)  HF experts.{j}.w1 / w3
    layers/moe/down    [L, E, F, D]  (layers, experts, mlp, embed)  HF experts.{j}.w2

Routing and the router losses are in :mod:`jaxarith.models.moe`. Attention has no biases and no
sliding window (refused, as for Mistral); ``router_jitter_noise`` (training-time input noise in
transformers) is not applied.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, ClassVar

import jax

from jaxarith.errors import ConfigError
from jaxarith.models import llama, moe
from jaxarith.models.family import (
    Arch,
    BlockContext,
    Family,
    Rule,
    check_positive,
    require,
)
from jaxarith.models.layers import rms_norm


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixtralConfig(llama.LlamaConfig):
    """Mixtral decoder configuration (HF names); Llama's fields plus the experts.

    Attributes:
      num_local_experts: E, experts per layer.
      num_experts_per_tok: k, experts each token is routed to.
      router_aux_loss_coef: weight of the load-balancing loss in training.
      moe_capacity_factor: jaxarith's own key (HF ignores it): 0 dropless (default), else the
        per-expert cap of :mod:`jaxarith.models.moe`.
    """

    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.001
    moe_capacity_factor: float = 0.0
    model_type: str = "mixtral"
    # the checkpoint's tensor layout (not a config.json key; see checkpoint_layout): False the
    # per-expert tensors save_pretrained writes, True transformers 5's fused experts (as
    # mergekit-moe 0.1.5 writes them)
    hf_fused_experts: bool = dataclasses.field(default=False, compare=False)

    arch: ClassVar[Arch] = Arch.MIXTRAL
    HF_KEYS_READ: ClassVar[frozenset[str]] = llama.LlamaConfig.HF_KEYS_READ | frozenset({
        "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
        "moe_capacity_factor",
    })
    HF_KEYS_IGNORED: ClassVar[frozenset[str]] = llama.LlamaConfig.HF_KEYS_IGNORED | frozenset({
        "output_router_logits", "router_jitter_noise",
    })

    @classmethod
    def from_dense(cls, dense: llama.LlamaConfig, experts: int, top_k: int) -> MixtralConfig:
        """The config of ``dense`` upcycled to ``experts`` experts, ``top_k`` per token (sparse
        upcycling, :mod:`jaxarith.arith.upcycle`); a model with biases is refused: Mixtral's
        attention and experts have none, so it could not compute the same function."""
        if dense.attention_bias or dense.mlp_bias:
            raise ConfigError(
                f"upcycle: the dense {dense.model_type} model has "
                f"{'attention' if dense.attention_bias else 'MLP'} biases; Mixtral has none, so "
                "it cannot compute the same function")
        if dense.sliding_window is not None:
            raise ConfigError(f"upcycle: the dense {dense.model_type} model has "
                              f"sliding_window={dense.sliding_window}; Mixtral's attention here "
                              "is global, so it could not compute the same function")
        if experts < 1 or not 1 <= top_k <= experts:
            raise ConfigError(f"upcycle: --top-k {top_k} must be between 1 and --experts "
                              f"{experts}")
        fields = {f.name: getattr(dense, f.name) for f in dataclasses.fields(dense)
                  if f.name not in ("model_type", "hf_extra")}
        extra = {k: v for k, v in dense.hf_extra.items()
                 if k not in ("architectures", "model_type", "attention_bias", "mlp_bias",
                              "pretraining_tp", "sliding_window", "use_sliding_window",
                              "max_window_layers", "layer_types")}
        return cls(**fields, num_local_experts=experts, num_experts_per_tok=top_k,
                   model_type="mixtral", hf_extra=extra)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, ("num_local_experts", "num_experts_per_tok"))
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
                              f"num_local_experts={self.num_local_experts}")
        if self.attention_bias or self.mlp_bias:
            raise ConfigError("mixtral has no attention or MLP biases (attention_bias and "
                              "mlp_bias must be false)")
        if self.moe_capacity_factor < 0:
            raise ConfigError(f"moe_capacity_factor={self.moe_capacity_factor} must be >= 0")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> MixtralConfig:
        window = d.get("sliding_window")
        if window not in (None, 0) and window < d.get("max_position_embeddings", 0):
            raise ConfigError(f"sliding_window={window} is not supported (set it to null)")
        base = super().from_hf(d)  # checks the keys, reads the Llama fields into cls
        return dataclasses.replace(
            base,
            num_local_experts=require(d, "num_local_experts"),
            num_experts_per_tok=require(d, "num_experts_per_tok"),
            router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
            moe_capacity_factor=float(d.get("moe_capacity_factor", 0.0)),
        )

    def to_hf(self) -> dict[str, Any]:
        d = super().to_hf()
        for key in ("attention_bias", "mlp_bias"):
            d.pop(key, None)
        d.update(model_type="mixtral", architectures=["MixtralForCausalLM"],
                 num_local_experts=self.num_local_experts,
                 num_experts_per_tok=self.num_experts_per_tok,
                 router_aux_loss_coef=self.router_aux_loss_coef)
        if self.moe_capacity_factor:
            d["moe_capacity_factor"] = self.moe_capacity_factor
        else:
            d.pop("moe_capacity_factor", None)
        return d


def param_specs(cfg: MixtralConfig) -> dict:
    specs = llama.param_specs(cfg)
    del specs["layers"]["mlp"]
    specs["layers"]["moe"] = moe.expert_specs(cfg.num_hidden_layers, cfg.hidden_size,
                                              cfg.num_local_experts, cfg.intermediate_size)
    return specs


def block(cfg: MixtralConfig, p: dict, x: jax.Array,
          ctx: BlockContext) -> tuple[jax.Array, jax.Array]:
    """One pre-norm block; returns (x, router logits [B, T, E] float32) for the router losses."""
    x = x + llama.self_attention(cfg, p, x, ctx)
    h = rms_norm(x, p["mlp_norm"]["scale"], cfg.rms_norm_eps)
    y, logits = moe.sparse_mlp(h, p["moe"], cfg.num_experts_per_tok,
                               capacity_factor=cfg.moe_capacity_factor)
    return x + y, logits


def hf_rules(cfg: MixtralConfig) -> list[Rule]:
    """HF ``MixtralForCausalLM`` tensors as ``save_pretrained`` writes them (one tensor per
    expert: ``block_sparse_moe.experts.{j}.w1/w2/w3``, router ``block_sparse_moe.gate``), or
    with ``cfg.hf_fused_experts`` in transformers 5's fused layout (``mlp.experts.gate_up_proj``
    ``[E, 2F, D]``, ``mlp.experts.down_proj`` ``[E, D, F]``, router ``mlp.gate``)."""
    D, E, F = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size
    rules = [r for r in llama.hf_rules(cfg) if ".mlp." not in r.hf_key]
    if cfg.hf_fused_experts:
        return rules + moe.expert_rules("model.layers.{i}.mlp.", D, E, F, None)
    return rules + moe.expert_rules("model.layers.{i}.block_sparse_moe.", D, E, F,
                                    ("w1", "w3", "w2"))


def _stored_keys(directory: str) -> list[str]:
    """Tensor names of the safetensors checkpoint in ``directory`` (from the index or the file
    header; nothing else is read). Empty when there is none (e.g. an Orbax checkpoint)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    try:
        if os.path.exists(index):
            with open(index) as f:
                return list(json.load(f).get("weight_map", {}))
        if os.path.exists(single):
            with open(single, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                return list(json.loads(f.read(n)))
    except (OSError, ValueError, struct.error):
        pass  # the loader reports a broken checkpoint with its own message
    return []


def checkpoint_layout(cfg: MixtralConfig, directory: str) -> MixtralConfig:
    """``cfg`` with ``hf_fused_experts`` set when ``directory`` stores fused experts."""
    fused = any(k.endswith("mlp.experts.gate_up_proj") for k in _stored_keys(directory))
    return dataclasses.replace(cfg, hf_fused_experts=fused) if fused else cfg


FAMILY = Family(
    arch=Arch.MIXTRAL,
    config_class=MixtralConfig,
    model_types=("mixtral",),
    param_specs=param_specs,
    embed=llama.embed,
    block=block,
    unembed=llama.unembed,
    head=llama.head,
    hf_rules=hf_rules,
    hf_buffers=("rotary_emb.inv_freq",),
    routed=True,
    checkpoint_layout=checkpoint_layout,
)
