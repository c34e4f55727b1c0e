"""Where each canonical tensor sits in its HF tensor (:data:`ops.Layout`), read off the keymap.

TIES keeps exactly k entries; ties at its threshold are broken by position in the HF tensor's
row-major order (the order mergekit and every HF tool see). jaxarith computes on canonical tensors
(``[in, ...]`` where HF stores ``[out, in]``), so each formula is told how the canonical tensor
maps onto HF's matrix: a ``(split, transposed)`` pair, found by pushing HF row and column indices
through the rule's own ``to_canon`` hook (broadcast arrays, so no memory) and checking the
candidates on sampled positions.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxarith.arith.ops import Layout
from jaxarith.errors import UnsupportedArchitectureError
from jaxarith.io.convert.keymap import Rule, rules_for
from jaxarith.models.config import ModelConfig

Path = tuple[str, ...]
_SAMPLES = 256


def _hf_index_views(rule: Rule, j: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(HF row, HF column) of every entry of target ``j`` as canonical-shaped views; HF cols."""
    shape = rule.hf_shape
    rows, cols = (shape[0], int(np.prod(shape[1:], dtype=np.int64))) if len(shape) > 1 else \
        (shape[0], 1)
    r = np.broadcast_to(np.arange(rows).reshape((rows,) + (1,) * (len(shape) - 1)), shape)
    if len(shape) > 1:
        c = np.broadcast_to(np.arange(cols).reshape((1,) + tuple(shape[1:])), shape)
    else:
        c = np.broadcast_to(np.zeros(1, np.int64), shape)
    return rule.to_canon(r)[j], rule.to_canon(c)[j], cols


def _flat(idx: tuple[np.ndarray, ...], shape: tuple[int, ...], n: int) -> np.ndarray:
    return np.ravel_multi_index(idx, shape) if shape else np.zeros(n, np.int64)


def _offset(x: np.ndarray, y: np.ndarray) -> bool:
    """``x - y`` is one constant (the block's offset inside a fused HF tensor, else 0)."""
    d = x - y
    return bool(np.all(d == d[0]))


@functools.lru_cache(maxsize=1024)
def rule_layout(rule: Rule, j: int) -> Layout:
    """The layout of target ``j`` of ``rule`` (see the module doc).

    Raises:
      UnsupportedArchitectureError: the HF tensor is not a matrix (transformers 5's fused
        Mixtral experts ``[E, 2F, D]``): merges need the per-expert layout.
    """
    if len(rule.hf_shape) > 2:
        raise UnsupportedArchitectureError(
            f"{rule.hf_key}: merges read HF matrices, this checkpoint stores {len(rule.hf_shape)}"
            "-D fused experts; write it in the per-expert layout first (jaxarith convert SRC "
            "ORBAX_DIR, then jaxarith convert ORBAX_DIR HF_DIR)")
    rc, cc, _ = _hf_index_views(rule, j)
    shape = rc.shape
    rng = np.random.default_rng(0)
    idx = tuple(np.concatenate([[0, n - 1], rng.integers(0, n, _SAMPLES)]) for n in shape)
    hf_row, hf_col = rc[idx], cc[idx]
    for split in range(1, len(shape) + 1):
        a = _flat(idx[:split], shape[:split], len(hf_row))
        b = _flat(idx[split:], shape[split:], len(hf_row))
        if _offset(hf_row, a) and _offset(hf_col, b):
            return (split, False)
        if _offset(hf_row, b) and _offset(hf_col, a):
            return (split, True)
    raise ValueError(f"{rule.hf_key}: canonical target {j} is not a matrix view of the HF tensor")


def hf_layouts(cfg: ModelConfig | None) -> dict[Path, Layout]:
    """{canonical path: layout} for every leaf of an architecture (empty for ``cfg=None``).

    A target of a fused HF tensor (GPT-2's ``c_attn``) gets its own block's layout: TIES and
    SLERP then see q, k and v as three tensors, not one (a documented difference to mergekit).
    """
    if cfg is None:
        return {}
    return {target: rule_layout(rule, j) for rule in rules_for(cfg)
            for j, target in enumerate(rule.targets)}
