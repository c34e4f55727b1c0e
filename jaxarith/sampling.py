"""Sampling methods: small frozen dataclasses with one method, ``select(logprobs, key)``.

They act on the *final* log-probabilities, i.e. after logit arithmetic has combined the models,
so top-k / top-p truncate the combined distribution (as emulated fine-tuning prescribes).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxarith.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Greedy:
    """The most likely token."""

    def transform(self, logprobs: jax.Array) -> jax.Array:
        return logprobs

    def select(self, logprobs: jax.Array, key: jax.Array) -> jax.Array:
        del key
        return jnp.argmax(logprobs, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sample:
    """Temperature, then top-k, then top-p (nucleus) truncation, then a categorical draw."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0 (use Greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k} must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")

    def transform(self, logprobs: jax.Array) -> jax.Array:
        """The normalised log-distribution actually sampled from, [B, V]."""
        x = logprobs / self.temperature
        neg = jnp.finfo(x.dtype).min
        if self.top_k is not None and self.top_k < x.shape[-1]:
            kth = jax.lax.top_k(x, self.top_k)[0][..., -1:]
            x = jnp.where(x >= kth, x, neg)
        if self.top_p is not None and self.top_p < 1:
            order = jnp.argsort(-x, axis=-1)
            sorted_x = jnp.take_along_axis(x, order, axis=-1)
            probs = jax.nn.softmax(sorted_x, axis=-1)
            # keep a token if the mass strictly before it is < top_p (the first always stays)
            before = jnp.cumsum(probs, axis=-1) - probs
            keep_sorted = before < self.top_p
            keep = jnp.zeros_like(keep_sorted).at[
                jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
            x = jnp.where(keep, x, neg)
        return jax.nn.log_softmax(x, axis=-1)

    def select(self, logprobs: jax.Array, key: jax.Array) -> jax.Array:
        return jax.random.categorical(key, self.transform(logprobs), axis=-1).astype(jnp.int32)


Sampler = Greedy | Sample
