"""Mixture-of-experts routing and router losses (Mixtral's and Qwen3-MoE's sparse MLP), as pure
functions, and the experts' parameter table and HF conversion rules.

Routing (``G(x) = Softmax(TopK(x W_g))`` as transformers' ``MixtralTopKRouter``): router logits in
float32, softmax over all E experts, the top k probabilities kept and renormalised to sum to 1
(or, with ``normalize=False``, kept as they are: Qwen3-MoE's ``norm_topk_prob: false``).

Dispatch is by *sorting*, not a dense loop over experts: the ``n * k`` (token, choice) pairs
are sorted by expert, gathered into one ``[n*k, D]`` array whose rows are grouped by expert, run
through the experts with grouped matmuls (``jax.lax.ragged_dot``, group sizes counted per call),
un-sorted, and combined with the routing weights. Every shape is static (``A`` is fixed), so it
jits once. Cost: ``k`` expert MLPs per token, never E.

Capacity (``capacity_factor``): 0 (the default) is **dropless**: every (token, choice) pair is
computed, as transformers does. ``c > 0`` caps each expert at ``C = ceil(c * n * k / E)`` pairs
per call: within an expert, pairs are kept in order of the flattened (token, choice) index, i.e.
earlier tokens of the batch first (row-major over ``[B, T]``) and for one token its first choice
before its second; a dropped pair contributes zero (the token keeps its residual), and the other
choice's weight is *not* renormalised. Padding tokens are routed like any token (their outputs
are never read), so with a cap they also take capacity.

Shape letters as in :mod:`jaxarith.models` (E experts, C = k choices per token); ``n`` is the
number of tokens of one call (``B * T``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxarith.models.family import ParamSpec, Rule, transpose_rule
from jaxarith.models.layers import to_compute
from jaxarith.models.remat import MLPWI_0, MLPWI_1, MLPWO


def router_logits(h: jax.Array, router: jax.Array) -> jax.Array:
    """Router logits ``[..., E]`` in float32 from hidden states ``[..., D]``, router [D, E]."""
    return jnp.einsum("...D,DE->...E", h.astype(jnp.float32), router.astype(jnp.float32))


def route(logits: jax.Array, top_k: int, normalize: bool = True) -> tuple[jax.Array, jax.Array]:
    """Top-k routing as transformers' Mixtral: softmax (float32), top k, renormalised.

    Args:
      logits: ``[..., E]`` router logits.
      normalize: renormalise the k kept probabilities to sum to 1 (Mixtral; Qwen3-MoE's
        ``norm_topk_prob``); False keeps them as the softmax over all E gave them.
    Returns:
      (weights ``[..., k]`` float32 (summing to 1 when ``normalize``), experts ``[..., k]``
      int32, best first).
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, idx = jax.lax.top_k(probs, top_k)
    if normalize:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return top, idx.astype(jnp.int32)


def capacity(n: int, top_k: int, experts: int, factor: float) -> int:
    """Pairs each expert may take per call: ``ceil(factor * n * k / E)`` (``factor`` 0: all)."""
    if factor <= 0:
        return n * top_k
    return max(1, math.ceil(factor * n * top_k / experts))


def experts_mlp(x: jax.Array, weights: jax.Array, experts: jax.Array, gate: jax.Array,
                up: jax.Array, down: jax.Array, *, capacity_factor: float = 0.0) -> jax.Array:
    """The weighted sum of each token's chosen SwiGLU experts, by sort-based grouped matmuls.

    Args:
      x: ``[n, D]`` tokens (already normalised).
      weights, experts: ``[n, k]`` from :func:`route`.
      gate, up: ``[E, D, F]``; down: ``[E, F, D]``.
      capacity_factor: 0 dropless; else the cap of the module docstring.
    Returns:
      ``[n, D]`` in x's dtype.
    """
    n, k = experts.shape
    e = gate.shape[0]
    flat = experts.reshape(-1)                       # [n*k] expert of each (token, choice)
    order = jnp.argsort(flat, stable=True)           # pairs grouped by expert
    xs = jnp.take(x, order // k, axis=0)             # [n*k, D]
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)  # [E]
    dt = x.dtype
    # tagged for the remat policies (jaxarith.models.remat); checkpoint_name is the identity
    g = checkpoint_name(jax.lax.ragged_dot(xs, to_compute(gate, dt), sizes), MLPWI_0)  # [n*k, F]
    u = checkpoint_name(jax.lax.ragged_dot(xs, to_compute(up, dt), sizes), MLPWI_1)
    ys = checkpoint_name(jax.lax.ragged_dot(jax.nn.silu(g) * u, to_compute(down, dt), sizes),
                         MLPWO)  # [n*k, D]
    cap = capacity(n, k, e, capacity_factor)
    if cap < n * k:
        starts = jnp.cumsum(sizes) - sizes
        rank = jnp.arange(n * k) - starts[flat[order]]
        ys = jnp.where((rank < cap)[:, None], ys, jnp.zeros_like(ys))
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    y = jnp.take(ys, inverse, axis=0).reshape(n, k, -1)  # back to [n, k, D]
    return jnp.einsum("TCD,TC->TD", y, weights.astype(dt))


def sparse_mlp(h: jax.Array, p: dict, top_k: int, *, normalize: bool = True,
               capacity_factor: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Mixtral's sparse MLP on ``h`` [B, T, D] with ``p`` = ``{router, gate, up, down}`` of one
    layer (``normalize``: see :func:`route`). Returns (output [B, T, D], router logits
    [B, T, E] float32)."""
    b, t, d = h.shape
    logits = router_logits(h, p["router"])
    weights, experts = route(logits, top_k, normalize)
    y = experts_mlp(h.reshape(b * t, d), weights.reshape(b * t, -1),
                    experts.reshape(b * t, -1), p["gate"], p["up"], p["down"],
                    capacity_factor=capacity_factor)
    return y.reshape(b, t, d), logits


# ----------------------------------------------------------------------------- parameters


def expert_specs(L: int, D: int, E: int, F: int) -> dict:
    """The ``layers/moe`` parameter table: the router and E SwiGLU experts of width F, stacked on
    the ``experts`` logical axis (sharded over the ``expert`` mesh axis)."""
    return {
        "router": ParamSpec((L, D, E), ("layers", "embed", None)),
        "gate": ParamSpec((L, E, D, F), ("layers", "experts", "embed", "mlp")),
        "up": ParamSpec((L, E, D, F), ("layers", "experts", "embed", "mlp")),
        "down": ParamSpec((L, E, F, D), ("layers", "experts", "mlp", "embed")),
    }


def expert_rules(prefix: str, D: int, E: int, F: int,
                 names: tuple[str, str, str] | None) -> list[Rule]:
    """HF rules of one sparse MLP (``{i}`` in ``prefix`` is the layer), router ``gate.weight``.

    ``names`` = (gate, up, down) module names: one ``nn.Linear`` per expert, as
    ``save_pretrained`` writes them (``experts.{j}.<name>.weight``). None: transformers 5's
    fused experts, ``experts.gate_up_proj`` ``[E, 2F, D]`` and ``experts.down_proj``
    ``[E, D, F]``.
    """
    target = ("layers", "moe")
    rules = [transpose_rule(prefix + "gate.weight", target + ("router",), (E, D))]
    if names is None:
        swap = (0, 2, 1)
        rules.append(Rule(prefix + "experts.gate_up_proj", (target + ("gate",), target + ("up",)),
                          (E, 2 * F, D),
                          lambda w: (w[:, :F].transpose(swap), w[:, F:].transpose(swap)),
                          lambda g, u: np.concatenate([g.transpose(swap), u.transpose(swap)],
                                                      axis=1)))
        rules.append(Rule(prefix + "experts.down_proj", (target + ("down",),), (E, D, F),
                          lambda w: (w.transpose(swap),), lambda c: c.transpose(swap)))
        return rules
    for hf, name, shape in zip(names, ("gate", "up", "down"), ((F, D), (F, D), (D, F)),
                               strict=True):
        rules.append(dataclasses.replace(
            transpose_rule(prefix + "experts.{j}." + hf + ".weight", target + (name,), shape),
            experts=E))
    return rules


# ----------------------------------------------------------------------------- router losses


def _mask(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """[1, B, T, 1] float32 weights of real tokens (all ones without a mask)."""
    if mask is None:
        return jnp.ones((1, *logits.shape[1:-1], 1), jnp.float32)
    return mask.astype(jnp.float32)[None, ..., None]


def expert_fractions(logits: jax.Array, top_k: int,
                     mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(tokens per expert, mean router probability per expert), pooled over layers and real
    tokens, as transformers' ``load_balancing_loss_func``: the first is the mean number of
    top-k choices of each expert per token (sums to k), the second the mean softmax (sums to 1).

    Args:
      logits: ``[L, B, T, E]`` router logits of every layer.
      mask: ``[B, T]`` 1 for real tokens.
    """
    e = logits.shape[-1]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    _, chosen = jax.lax.top_k(probs, top_k)
    counts = jnp.sum(jax.nn.one_hot(chosen, e, dtype=jnp.float32), axis=-2)  # [L, B, T, E]
    m = _mask(logits, mask)
    rows = jnp.maximum(jnp.sum(m) * logits.shape[0], 1.0)
    return jnp.sum(counts * m, axis=(0, 1, 2)) / rows, jnp.sum(probs * m, axis=(0, 1, 2)) / rows


def load_balancing_loss(logits: jax.Array, top_k: int, mask: jax.Array | None = None) -> jax.Array:
    """transformers' ``load_balancing_loss_func``: ``E * sum_e f_e * P_e`` with ``f`` and ``P``
    of :func:`expert_fractions` (pooled over layers; 1 * k when perfectly balanced)."""
    f, p = expert_fractions(logits, top_k, mask)
    return logits.shape[-1] * jnp.sum(f * p)


def router_z_loss(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """ST-MoE's router z-loss: mean over layers and real tokens of ``logsumexp(logits)^2``."""
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)[..., None]  # [L, B, T, 1]
    m = _mask(logits, mask)
    return jnp.sum(z * z * m) / jnp.maximum(jnp.sum(m) * logits.shape[0], 1.0)


def np_load_balancing_loss(logits: np.ndarray, top_k: int, mask: np.ndarray | None = None
                           ) -> float:
    """A float64 numpy reference of :func:`load_balancing_loss` (for tests): the formula read
    straight off transformers' code, with a per-token Python loop."""
    logits = np.asarray(logits, np.float64)
    n_layers, b, t, e = logits.shape
    mask = np.ones((b, t)) if mask is None else np.asarray(mask, np.float64)
    tokens = np.zeros(e)
    probs = np.zeros(e)
    rows = 0.0
    for layer in range(n_layers):
        for i in range(b):
            for j in range(t):
                z = logits[layer, i, j] - logits[layer, i, j].max()
                p = np.exp(z) / np.exp(z).sum()
                for c in np.argsort(-p, kind="stable")[:top_k]:
                    tokens[c] += mask[i, j]
                probs += p * mask[i, j]
                rows += mask[i, j]
    return float(e * np.sum((tokens / rows) * (probs / rows)))
