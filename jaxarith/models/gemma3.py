"""Gemma 3 text family (HF ``model_type: gemma3_text``, e.g. Gemma-3-1B): Gemma 2's block
(``gemma2.py``) with q/k RMSNorm and RoPE per layer type.

- q and k are RMS-normalised over the head dim (Gemma's ``1 + w`` norm) before RoPE:
  ``layers/attn/q_norm``, ``layers/attn/k_norm`` ``[L, H]`` (HF ``self_attn.q_norm/k_norm``);
- local (``sliding_attention``) layers rotate with ``rope_local_base_freq`` (10k), global ones
  with ``rope_theta`` (1M) and ``rope_scaling`` (transformers 5.x: ``rope_parameters`` keyed by
  layer type); the layer types default to every 6th layer global (``sliding_window_pattern``);
- no soft-capping by default; ``attn_logit_softcapping`` is refused, because transformers'
  Gemma 3 does not apply it (jaxarith would differ from it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxarith.errors import ConfigError
from jaxarith.models import gemma2
from jaxarith.models.family import Arch, BlockContext, Family, ParamSpec, Rule, copy_rule
from jaxarith.models.gemma2 import FULL, SLIDING
from jaxarith.models.layers import RopeScaling, rope_inv_freq


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma3TextConfig(gemma2.Gemma2Config):
    """Gemma 3 text decoder configuration (HF names); Gemma 2's fields plus the local RoPE.

    Attributes:
      rope_theta, rope_scaling: RoPE of the global (``full_attention``) layers.
      rope_local_base_freq, rope_local_scaling: RoPE of the local (``sliding_attention``)
        layers.
    """

    max_position_embeddings: int = 131072
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_local_scaling: RopeScaling = RopeScaling()
    sliding_window_pattern: int = 6
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    model_type: str = "gemma3_text"

    arch: ClassVar[Arch] = Arch.GEMMA3
    HF_KEYS_READ: ClassVar[frozenset[str]] = gemma2.Gemma2Config.HF_KEYS_READ | frozenset({
        "rope_local_base_freq", "sliding_window_pattern",
    })
    HF_KEYS_IGNORED: ClassVar[frozenset[str]] = (
        gemma2.Gemma2Config.HF_KEYS_IGNORED - {"sliding_window_pattern"}) | frozenset({
            "_sliding_window_pattern",
        })

    def __post_init__(self):
        super().__post_init__()
        if self.attn_logit_softcapping is not None:
            raise ConfigError(
                f"attn_logit_softcapping={self.attn_logit_softcapping} is not supported for "
                "gemma3_text: transformers' Gemma 3 does not apply it (set it to null)")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Gemma3TextConfig:
        pattern = d.get("sliding_window_pattern") or 6
        kw = cls._common_from_hf(d, pattern)
        # transformers 5.x: {"sliding_attention": {...}, "full_attention": {...}}; 4.x:
        # rope_theta / rope_scaling (global), rope_local_base_freq (local). Both as
        # Gemma3TextConfig.convert_rope_params_to_dict merges them.
        params = d.get("rope_parameters") or {}
        if not isinstance(params, dict) or not set(params) <= {SLIDING, FULL}:
            raise ConfigError(f"rope_parameters={params!r}: gemma3_text expects a dict keyed "
                              f"by layer type ({SLIDING!r}, {FULL!r})")
        full = dict(params.get(FULL) or {"rope_type": "default"})
        if d.get("rope_scaling"):
            full.update(d["rope_scaling"])
        full.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
        local = dict(params.get(SLIDING) or {"rope_type": "default"})
        local.setdefault("rope_theta", d.get("rope_local_base_freq", 10_000.0))
        theta, scaling = RopeScaling.from_hf({"rope_parameters": full})
        local_theta, local_scaling = RopeScaling.from_hf({"rope_parameters": local})
        return cls(**kw, rope_theta=theta, rope_scaling=scaling,
                   rope_local_base_freq=local_theta, rope_local_scaling=local_scaling,
                   attn_logit_softcapping=d.get("attn_logit_softcapping"),
                   final_logit_softcapping=d.get("final_logit_softcapping"))

    def to_hf(self) -> dict[str, Any]:
        d = self._common_to_hf()
        d.pop("rope_local_base_freq", None)

        def one(theta, scaling):
            return {"rope_type": "default", **(scaling.to_hf() or {}), "rope_theta": theta}

        d.update(architectures=d.get("architectures") or ["Gemma3ForCausalLM"],
                 sliding_window_pattern=self.sliding_window_pattern,
                 rope_parameters={
                     FULL: one(self.rope_theta, self.rope_scaling),
                     SLIDING: one(self.rope_local_base_freq, self.rope_local_scaling)})
        return d


# ----------------------------------------------------------------------------- parameters


def param_specs(cfg: Gemma3TextConfig) -> dict:
    specs = gemma2.param_specs(cfg)
    qk = ParamSpec((cfg.num_hidden_layers, cfg.head_dim), ("layers", "head_dim"), "zeros")
    specs["layers"]["attn"] |= {"q_norm": qk, "k_norm": qk}
    return specs


# ----------------------------------------------------------------------------- forward


@functools.lru_cache(maxsize=64)
def _inv_freqs(cfg: Gemma3TextConfig) -> tuple[np.ndarray, np.ndarray]:
    """(local, global) inverse RoPE frequencies [H // 2]."""
    return (rope_inv_freq(cfg.head_dim, cfg.rope_local_base_freq, cfg.rope_local_scaling),
            rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))


def block(cfg: Gemma3TextConfig, p: dict, x: jax.Array, ctx: BlockContext) -> jax.Array:
    local, full = _inv_freqs(cfg)
    # the layer index is traced inside the layer scan: select by a static table
    is_local = jnp.asarray([t == SLIDING for t in cfg.layer_types])[ctx.layer]
    inv_freq = jnp.where(is_local, jnp.asarray(local), jnp.asarray(full))
    return gemma2.sandwich(cfg, p, x, ctx,
                           lambda h: gemma2.attention(cfg, p, h, ctx, inv_freq, qk_norm=True))


# ----------------------------------------------------------------------------- HF conversion


def hf_rules(cfg: Gemma3TextConfig) -> list[Rule]:
    """HF ``Gemma3ForCausalLM`` tensors: Gemma 2's plus ``self_attn.q_norm/k_norm``."""
    p = "model.layers.{i}.self_attn."
    return gemma2.hf_rules(cfg) + [
        copy_rule(p + f"{n}_norm.weight", ("layers", "attn", f"{n}_norm"), (cfg.head_dim,))
        for n in ("q", "k")]


FAMILY = Family(
    arch=Arch.GEMMA3,
    config_class=Gemma3TextConfig,
    model_types=("gemma3_text",),
    param_specs=param_specs,
    embed=gemma2.embed,
    block=block,
    unembed=gemma2.unembed,
    head=gemma2.head,
    hf_rules=hf_rules,
    hf_buffers=("_inv_freq", "embed_tokens.embed_scale"),
    attention_windows=gemma2.attention_windows,
    logit_softcap=gemma2.logit_softcap,
    with_depth=gemma2.with_depth,
    depth_sensitive=gemma2.depth_sensitive,
)
