"""The one per-tensor step both executors run: cast to float32, key, formula, selection, cast.

``memory.py`` vmaps :func:`tensor_step` over the stacked ``layers`` axis inside one jit over the
tree; ``stream.py`` jits it for one HF tensor at a time. Same function, same formula objects, so
the two executors agree bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxarith.arith.methods import Method
from jaxarith.arith.ops import Layout

NO_LAYER = np.uint32(0xFFFFFFFF)  # folded into the key of tensors outside the layers
# Parameters that are not float32: keep counts, and TIES thresholds found on the host.
_PARAM_DTYPES = {"k": jnp.int32, "k_lo": jnp.int32, "thr": jnp.uint32, "cut": jnp.int32}


def tensor_key(path_seed: jax.Array, layer: jax.Array) -> jax.Array:
    """PRNG key of one tensor (and layer): ``fold_in(key(seed, hash(path)), layer)``."""
    return jax.random.fold_in(jax.random.wrap_key_data(path_seed, impl="threefry2x32"), layer)


def tensor_step(method: Method, xs: tuple[jax.Array, ...], p: dict, path_seed: jax.Array,
                layer: jax.Array, selected: jax.Array | bool, out_dtype,
                layout: Layout = None) -> jax.Array:
    """Result of ``method`` on one tensor, computed in float32 and cast to ``out_dtype``.

    Args:
      xs: the inputs (any float dtype), all of one shape: a tuple, or one array stacking them on
        a leading axis (many inputs: one argument and one cast instead of one per input).
      p: parameters from :meth:`MergeSpec.tensor_params`.
      path_seed: ``[2] uint32`` from :func:`select.path_seed`; layer: uint32 index or NO_LAYER.
      selected: a Python bool (static) or a traced bool (a per-layer selection).
      layout: where the tensor sits in its HF tensor (TIES' tie order).
    """
    if isinstance(xs, tuple | list):
        xs = tuple(jnp.asarray(x) for x in xs)
        if method.merge_dtype is not None:  # a merge config's `dtype`: inputs as mergekit sees them
            xs = tuple(x.astype(method.merge_dtype) for x in xs)
        xs32 = tuple(x.astype(jnp.float32) for x in xs)
    else:  # one stacked [n, ...] array: the program's size does not grow with n (see stream.py)
        xs = jnp.asarray(xs)
        if method.merge_dtype is not None:
            xs = xs.astype(method.merge_dtype)
        xs32 = xs.astype(jnp.float32)
    p = {k: jnp.asarray(v).astype(_PARAM_DTYPES.get(k, jnp.float32)) for k, v in p.items()}
    if selected is False:
        return method.passthrough(xs32).astype(out_dtype)
    out = method(xs32, p, tensor_key(path_seed, layer), layout)
    if selected is not True:
        out = jnp.where(selected, out, method.passthrough(xs32))
    if method.merge_dtype is not None:
        out = out.astype(method.merge_dtype)
    return out.astype(out_dtype)
