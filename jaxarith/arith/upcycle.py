"""Sparse upcycling (Komatsuzaki et al. 2023): a dense Llama/Mistral becomes a Mixtral whose
every expert is a copy of the dense MLP.

Everything but the MLPs is copied; each layer's E experts are copies of its MLP (optionally plus
Gaussian noise of a given std, each expert its own draw) and its router is random (normal, std
0.02, as transformers initialises it) or zeros. With exact copies the upcycled model computes the
dense model's function whatever the router: the top-k weights are renormalised to sum to 1 and
every chosen expert returns the same output. Mixtral has no biases, so a GPT-2 or a Llama with
attention or MLP biases is refused (a clear error, before any weight is read).
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp

from jaxarith.errors import ConfigError, UnsupportedArchitectureError
from jaxarith.models import transformer
from jaxarith.models.config import ModelConfig
from jaxarith.models.family import Arch
from jaxarith.models.mixtral import MixtralConfig

ROUTER_STD = 0.02


class RouterInit(enum.StrEnum):
    RANDOM = "random"
    ZEROS = "zeros"


def upcycle_config(dense: ModelConfig, experts: int, top_k: int) -> MixtralConfig:
    """The Mixtral config of ``dense`` with ``experts`` experts, ``top_k`` per token.

    Raises:
      UnsupportedArchitectureError: not a Llama-family model (GPT-2, Mixtral, ...).
      ConfigError: attention or MLP biases, ``top_k`` not in ``[1, experts]``.
    """
    if getattr(dense, "arch", None) != Arch.LLAMA:
        raise UnsupportedArchitectureError(
            f"upcycle: the dense model is a {dense.model_type} model; only bias-free Llama / "
            "Mistral models can be upcycled to Mixtral (its attention and experts have no "
            "biases, GPT-2 has learned positions and biases)")
    if dense.attention_bias or dense.mlp_bias:
        raise ConfigError(
            f"upcycle: the dense {dense.model_type} model has "
            f"{'attention' if dense.attention_bias else 'MLP'} biases; Mixtral has none, so it "
            "cannot compute the same function")
    if experts < 1 or not 1 <= top_k <= experts:
        raise ConfigError(f"upcycle: --top-k {top_k} must be between 1 and --experts {experts}")
    fields = {f.name: getattr(dense, f.name) for f in dataclasses.fields(dense)
              if f.name not in ("model_type", "hf_extra")}
    extra = {k: v for k, v in dense.hf_extra.items()
             if k not in ("architectures", "model_type", "attention_bias", "mlp_bias",
                          "pretraining_tp", "sliding_window", "use_sliding_window",
                          "max_window_layers", "layer_types")}
    return MixtralConfig(**fields, num_local_experts=experts, num_experts_per_tok=top_k,
                         model_type="mixtral", hf_extra=extra)


def upcycle_params(params: dict, cfg: MixtralConfig, key: jax.Array, *, noise: float = 0.0,
                   router: RouterInit | str = RouterInit.RANDOM, mesh=None) -> dict:
    """The upcycled tree from a dense Llama tree (under jit, placed on ``mesh`` by the
    Mixtral's logical axes; float32 noise and router, cast to the MLP's dtype).

    Args:
      params: the dense canonical tree (``layers/mlp/{gate,up,down}``).
      cfg: from :func:`upcycle_config`.
      key: PRNG key of the router and the noise.
      noise: std of the Gaussian noise added to each expert copy (0: exact copies).
      router: ``random`` (normal, std 0.02) or ``zeros``.
    """
    router = RouterInit(router)
    if noise < 0:
        raise ConfigError(f"upcycle: --noise {noise} must be >= 0")
    E, L, D = cfg.num_local_experts, cfg.num_hidden_layers, cfg.hidden_size
    shardings = None if mesh is None else transformer.param_shardings(cfg, mesh)

    def make(params, key):
        layers = dict(params["layers"])
        mlp = layers.pop("mlp")
        k_router, k_noise = jax.random.split(key)
        moe = {}
        for i, name in enumerate(("gate", "up", "down")):
            w = mlp[name]  # [L, D, F] or [L, F, D]
            stacked = jnp.broadcast_to(w[:, None], (w.shape[0], E, *w.shape[1:]))
            if noise > 0:
                draw = jax.random.normal(jax.random.fold_in(k_noise, i), stacked.shape,
                                         jnp.float32)
                stacked = (stacked.astype(jnp.float32) + noise * draw).astype(w.dtype)
            moe[name] = stacked
        dt = mlp["gate"].dtype
        moe["router"] = (jnp.zeros((L, D, E), dt) if router is RouterInit.ZEROS else
                         (ROUTER_STD * jax.random.normal(k_router, (L, D, E))).astype(dt))
        layers["moe"] = moe
        return {**params, "layers": layers}

    return jax.jit(make, out_shardings=shardings)(params, key)
