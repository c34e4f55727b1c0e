"""Per-token negative log-likelihood of a text under a model, scored in consecutive windows."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxarith import sharding
from jaxarith.errors import ConfigError
from jaxarith.models.config import ModelConfig
from jaxarith.models.transformer import check_token_ids, next_token_loss


@dataclasses.dataclass(frozen=True)
class LossResult:
    loss: float  # mean NLL per predicted token (nats)
    tokens: int  # predicted tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


def windows(ids: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Split ids into windows of ``seq_len`` that overlap by one token.

    Every token but the first is predicted exactly once, whatever the window length, so the
    loss of a text does not depend on how it is cut.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len={seq_len} must be at least 2")
    step = seq_len - 1
    return [ids[s: s + seq_len] for s in range(0, max(len(ids) - 1, 1), step)]


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _batch_nll(params, cfg, tokens, mask, dtype):
    return next_token_loss(params, cfg, tokens, mask, dtype=dtype)


def eval_loss(
    params: dict,
    cfg: ModelConfig,
    token_ids: np.ndarray | list[int],
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    mesh: jax.sharding.Mesh | None = None,
    dtype=jnp.float32,
    progress: bool = False,
) -> LossResult:
    """Mean next-token NLL of ``token_ids`` under the model.

    Windows of ``seq_len`` tokens (default: the model's context length) are batched
    ``batch_size`` at a time into fixed-shape, right-padded batches, so the loss compiles once.
    On a mesh the batch is sharded over the data-parallel axes (rounded up to divide them).
    A ``seq_len`` above the context length is cut to it (the CLI warns).
    """
    check_token_ids(np.asarray(token_ids), cfg.vocab_size, "token_ids")
    ids = np.asarray(token_ids, dtype=np.int32)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    if ids.size < 2:
        raise ValueError("need at least two tokens to score")
    seq_len = min(seq_len or cfg.context_length, cfg.context_length)
    seq_len = min(seq_len, len(ids))
    wins = windows(ids, seq_len)
    if mesh is not None:
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        batch_size = -(-batch_size // dp) * dp
    batch_size = min(batch_size, len(wins)) if mesh is None else batch_size
    total, count = 0.0, 0.0
    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with ctx:
        for b in tqdm(range(0, len(wins), batch_size), desc="eval", disable=not progress,
                      leave=False):
            chunk = wins[b: b + batch_size]
            tokens = np.zeros((batch_size, seq_len), np.int32)
            mask = np.zeros((batch_size, seq_len), np.int32)
            for i, w in enumerate(chunk):
                tokens[i, : len(w)] = w
                mask[i, : len(w)] = 1
            if mesh is not None:
                shd = sharding.named_sharding(mesh, ("batch", "seq"), tokens.shape)
                tokens, mask = jax.device_put(tokens, shd), jax.device_put(mask, shd)
            nll, n = _batch_nll(params, cfg, tokens, mask, jnp.dtype(dtype))
            total += float(nll)
            count += float(n)
    return LossResult(loss=total / count, tokens=int(count))
