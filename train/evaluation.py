"""Held-out evaluation during training: the jitted, sharded loss of fixed eval windows."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxarith import data as data_lib
from jaxarith import sharding
from jaxarith.models import transformer
from jaxarith.models.config import ModelConfig


def local_rows(x: np.ndarray) -> np.ndarray:
    return x[jax.process_index()::jax.process_count()]


def eval_examples(source, n: int) -> dict:
    """The first ``n`` held-out examples of a source as fields: ``tokens`` ``[n, T]`` and, when
    the source gives them (``data.eval_windows`` returning a dict), e.g. ``weights`` ``[n, T]``."""
    ex = data_lib.eval_windows(source, n)
    return dict(ex) if isinstance(ex, dict) else {"tokens": ex}


# the per-token fields an eval example may carry besides ``tokens`` (padding rows get zeros)
EVAL_FIELDS = {"weights": np.float32, "segment_ids": np.int32, "positions": np.int32}


@functools.lru_cache(maxsize=4)
def make_eval(model_cfg: ModelConfig, mesh, batch: int, seq_len: int, compute_dtype: str):
    """``evaluate(params, examples) -> mean NLL`` over ``[batch, seq_len]`` batches (jitted).

    ``examples``: a ``[n, T]`` token array, or a dict with ``tokens`` and optionally
    ``weights`` (loss weights of target tokens, as in training: a chat source scores only its
    weighted tokens) and packed documents' ``segment_ids`` and ``positions``."""
    dtype = jnp.dtype(compute_dtype)
    shd = sharding.named_sharding(mesh, ("batch", "seq"), (batch, seq_len))
    pshd = transformer.param_shardings(model_cfg, mesh)

    def fn(params, tokens, mask, extra):
        return transformer.next_token_loss(params, model_cfg, tokens, mask, dtype=dtype,
                                           **extra)

    # one program per set of extra fields (jit retraces by the dict's keys)
    jitted = jax.jit(fn, in_shardings=(pshd, shd, shd, shd))

    def put(x):
        return jax.make_array_from_process_local_data(shd, local_rows(x))

    def evaluate(params, examples) -> float:
        ex = examples if isinstance(examples, dict) else {"tokens": examples}
        windows = ex["tokens"]
        names = [k for k in EVAL_FIELDS if ex.get(k) is not None]
        total, count = 0.0, 0.0
        with jax.set_mesh(mesh):
            for s in range(0, len(windows), batch):
                chunk = windows[s: s + batch]
                tokens = np.zeros((batch, seq_len), np.int32)
                mask = np.zeros((batch, seq_len), np.int32)
                tokens[: len(chunk)], mask[: len(chunk)] = chunk, 1
                extra = {}
                for k in names:
                    v = np.zeros((batch, seq_len), EVAL_FIELDS[k])
                    v[: len(chunk)] = ex[k][s: s + batch]
                    extra[k] = put(v)
                nll, n = jitted(params, put(tokens), put(mask), extra)
                total, count = total + float(nll), count + float(n)
        return total / max(count, 1.0)

    return evaluate
