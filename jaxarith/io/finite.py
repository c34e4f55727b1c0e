"""Non-finite weights (NaN, +-Inf): refused where weights enter, never written as new values.

Every tensor read from a checkpoint (:class:`~jaxarith.io.convert.safetensors_io.SafetensorsFile`,
the Orbax restore in :mod:`jaxarith.io.convert.orbax`) passes :func:`check_input`; every tensor
written (``write_safetensors``, ``save_orbax``) passes :func:`check_output`. The check is one
pair of reductions per tensor (``min`` and ``max`` propagate NaN and show an Inf), with a full
scan for the count and first index only when one is found.

``--allow-nonfinite`` (every command) or :func:`allow_nonfinite` turns the refusal off for the
whole process: inputs may then hold non-finite values, and outputs may carry them through (a
non-finite output is then not told apart from one copied from an input).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import numpy as np

from jaxarith.errors import CheckpointError

# A process-wide switch, not a contextvar: tensors are read on worker threads.
_ALLOW = [False]
_WARNED: set[tuple[str, str]] = set()


class NonFiniteError(CheckpointError):
    """A checkpoint holds NaN or Inf values, or an operation produced them."""


def set_allow_nonfinite(allow: bool) -> None:
    """Accept (True) or refuse (False, the default) non-finite weights in this process."""
    _ALLOW[0] = bool(allow)


def nonfinite_allowed() -> bool:
    return _ALLOW[0]


@contextlib.contextmanager
def allow_nonfinite(allow: bool = True) -> Iterator[None]:
    """Within the block, non-finite weights are accepted (``allow=True``) or refused."""
    old = _ALLOW[0]
    _ALLOW[0] = bool(allow)
    try:
        yield
    finally:
        _ALLOW[0] = old


def _is_float(dtype) -> bool:
    import jax.numpy as jnp

    return bool(jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating))


def nonfinite(x) -> tuple[int, tuple[int, ...]] | None:
    """(how many entries of ``x`` are NaN or Inf, index of the first) or None if all are finite.

    ``x`` is a numpy array (host) or a ``jax.Array`` (possibly sharded: the reduction runs on
    its devices). Non-float arrays are always finite.
    """
    if not _is_float(x.dtype) or x.size == 0:
        return None
    if isinstance(x, np.ndarray):
        if np.isfinite(x.min()) and np.isfinite(x.max()):  # no temporary the size of x
            return None
        bad = ~np.isfinite(x)
        first = np.unravel_index(int(np.argmax(bad)), x.shape)
        return int(bad.sum()), tuple(int(i) for i in first)
    import jax.numpy as jnp

    count = int(_count_nonfinite(x))
    if count == 0:
        return None
    first = np.unravel_index(int(jnp.argmin(jnp.isfinite(x).reshape(-1))), x.shape)
    return count, tuple(int(i) for i in first)


def _count_nonfinite(x):
    import jax.numpy as jnp

    return jnp.sum(~jnp.isfinite(x))


def describe(found: tuple[int, tuple[int, ...]]) -> str:
    count, first = found
    return f"{count} non-finite value(s) (NaN/Inf), the first at index {list(first)}"


def check_input(x, name: str, where: str) -> None:
    """Refuse a tensor read from a checkpoint that holds NaN or Inf (allowed: report it on
    stderr, once per tensor).

    Args:
      x: the tensor as read.
      name: the tensor's name in the checkpoint.
      where: the file or checkpoint directory it was read from.
    Raises:
      NonFiniteError: naming the tensor, the count and the first index.
    """
    found = nonfinite(x)
    if found is None:
        return
    if not _ALLOW[0]:
        raise NonFiniteError(f"{where}: tensor {name} holds {describe(found)}; fix the "
                             "checkpoint or pass --allow-nonfinite to use it anyway")
    if (where, name) not in _WARNED:  # each tensor reported once, however often it is read
        _WARNED.add((where, name))
        print(f"jaxarith: warning: {where}: tensor {name} holds {describe(found)} (used: "
              "--allow-nonfinite)", file=sys.stderr)


def check_output(x, name: str, where: str) -> None:
    """Refuse to write a tensor with NaN or Inf values (unless allowed): with finite inputs
    (the inputs were checked) such values were produced by the operation.

    Raises:
      NonFiniteError: naming the tensor, the count and the first index.
    """
    if _ALLOW[0]:
        return
    found = nonfinite(x)
    if found is not None:
        raise NonFiniteError(f"{where}: the result for tensor {name} has {describe(found)} "
                             "(the inputs were finite: the operation or the output dtype "
                             "overflowed); nothing was written. --allow-nonfinite writes it "
                             "anyway")


def check_output_tree(params, where: str) -> None:
    """:func:`check_output` of every leaf of a canonical tree (named by its path)."""
    if _ALLOW[0]:
        return
    import jax

    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        check_output(leaf, name, where)


def check_input_tree(params, where: str) -> None:
    """:func:`check_input` of every leaf of a restored tree (named by its path)."""
    import jax

    for path, leaf in jax.tree_util.tree_leaves_with_path(
            params, is_leaf=lambda v: hasattr(v, "shape") and hasattr(v, "dtype")):
        if hasattr(leaf, "dtype"):
            name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            check_input(leaf, name, where)
