"""Sampling methods: small frozen dataclasses with one method, ``get_next_tokens(logprobs, rng)``.

They act on the *final* log-probabilities, i.e. after logit arithmetic has combined the models,
so temperature / top-k / top-p shape the combined distribution (as emulated fine-tuning
prescribes: top-p is applied after combining). Being frozen and hashable, a sampler is part of
the static :class:`jaxarith.decode.loop.DecodeSpec` and keys the compilation cache.

Shapes: B batch, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxarith.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Greedy:
    """The most likely token (ties: the lowest id, like ``torch.argmax``)."""

    def transform(self, logprobs: jax.Array) -> jax.Array:
        """The distribution a greedy decoder follows, [B, V]: unchanged (it takes the argmax)."""
        return logprobs

    def get_next_tokens(self, logprobs: jax.Array, rng: jax.Array) -> jax.Array:
        """Argmax tokens [B] (int32) of ``logprobs`` [B, V]; ``rng`` is unused."""
        del rng
        return jnp.argmax(logprobs, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
    """Temperature, then top-k, then top-p (nucleus) truncation, then a categorical draw.

    Attributes:
      temperature: divides the log-probabilities (> 0; use :class:`Greedy` for 0).
      top_k: keep the k most likely tokens (ties at the k-th value are all kept).
      top_p: keep the smallest set of most likely tokens whose mass reaches ``top_p`` (a token
        is kept when the mass strictly before it is < top_p, so the first is always kept;
        tokens tied with the last kept one are kept too).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0 (use Greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k} must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")

    def transform(self, logprobs: jax.Array) -> jax.Array:
        """The normalised log-distribution actually sampled from, [..., V] float32.

        Truncated tokens get -inf (exactly zero probability).
        """
        shape = logprobs.shape
        x = logprobs.reshape(-1, shape[-1]).astype(jnp.float32) / self.temperature
        if self.top_k is not None and self.top_k < x.shape[-1]:
            kth = jax.lax.top_k(x, self.top_k)[0][..., -1:]
            x = jnp.where(x >= kth, x, -jnp.inf)
        if self.top_p is not None and self.top_p < 1:
            # the cut-off is the smallest value kept in descending order (no scatter needed)
            sorted_x = -jnp.sort(-x, axis=-1)
            probs = jax.nn.softmax(sorted_x, axis=-1)
            keep_sorted = jnp.cumsum(probs, axis=-1) - probs < self.top_p
            cutoff = jnp.min(jnp.where(keep_sorted, sorted_x, jnp.inf), -1, keepdims=True)
            x = jnp.where(x >= cutoff, x, -jnp.inf)
        return jax.nn.log_softmax(x, axis=-1).reshape(shape)

    def get_next_tokens(self, logprobs: jax.Array, rng: jax.Array) -> jax.Array:
        """Tokens [B] (int32) drawn from :meth:`transform` of ``logprobs`` [B, V]."""
        return jax.random.categorical(rng, self.transform(logprobs), axis=-1).astype(jnp.int32)


Sampler = Greedy | Sampling
