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

import enum

import jax
import jax.numpy as jnp

from jaxarith.errors import ConfigError, UnsupportedArchitectureError
from jaxarith.models import transformer
from jaxarith.models.config import ModelConfig
from jaxarith.models.mixtral import MixtralConfig
from jaxarith.models.registry import family_for_model_type

ROUTER_STD = 0.02


class RouterInit(enum.StrEnum):
    RANDOM = "random"
    ZEROS = "zeros"


def upcycle_config(dense: ModelConfig, experts: int, top_k: int) -> ModelConfig:
    """The mixture-of-experts config of ``dense`` with ``experts`` experts, ``top_k`` per token
    (built by the target family: ``Family.upcycles_to``, e.g. Llama -> Mixtral).

    Raises:
      UnsupportedArchitectureError: the family has no sparse counterpart (GPT-2, Mixtral, ...).
      ConfigError: attention or MLP biases, ``top_k`` not in ``[1, experts]``.
    """
    target = transformer.family(dense).upcycles_to
    if target is None:
        raise UnsupportedArchitectureError(
            f"upcycle: the dense model is a {dense.model_type} model; only bias-free Llama / "
            "Mistral models can be upcycled to Mixtral (its attention and experts have no "
            "biases, GPT-2 has learned positions and biases)")
    return family_for_model_type(target).config_class.from_dense(dense, experts, top_k)


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
