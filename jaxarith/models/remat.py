"""Rematerialisation policies, by MaxText's names: what a scanned block keeps for the backward
pass, and what it computes again.

The blocks tag their projections with :func:`jax.ad_checkpoint.checkpoint_name` (the identity:
the numbers do not change) under MaxText's names (:data:`QUERY_PROJ` ...); a policy then says
which tagged values :func:`jax.checkpoint` keeps in device memory, moves to host memory, or
drops and recomputes from the block's input.

=======================  ==========================================================================
``none``                 no checkpoint: every intermediate the backward pass needs stays on device
``full``                 keep only the block's input; recompute the whole block
``minimal``              keep every matmul without batch dimensions (all projections, MLP
                         included), recompute attention and elementwise work
                         (``dots_with_no_batch_dims_saveable``, as MaxText's ``minimal``)
``save_dot_except_mlp``  keep the q/k/v and attention-output projections; recompute the MLP
``save_qkv_proj``        keep the q/k/v projections only
``save_out_proj``        keep the attention-output projection only
``offload``              keep the projections of ``minimal`` (by name) in pinned host memory,
                         not HBM (MaxText's ``minimal_offloaded``); a TPU/GPU feature
=======================  ==========================================================================

``true`` is ``full`` and ``false`` is ``none`` (the earlier boolean ``model.remat``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import jax

from jaxarith.models.family import parse_enum

QUERY_PROJ = "query_proj"  # q = x W_q (+ bias), before RoPE and any q norm: [B, T, N, H]
KEY_PROJ = "key_proj"
VALUE_PROJ = "value_proj"
QKV_PROJ = "qkv_proj"  # a fused q/k/v projection (none of our families has one today)
CONTEXT = "context"  # the attention's output before the output projection: [B, T, N, H]
OUT_PROJ = "out_proj"  # the attention's output projection: [B, T, D]
MLPWI = "mlpwi"  # an ungated MLP's input projection (GPT-2): [B, T, F]
MLPWI_0 = "mlpwi_0"  # a gated MLP's gate projection, before its activation
MLPWI_1 = "mlpwi_1"  # a gated MLP's up projection
MLPWO = "mlpwo"  # the MLP's output projection: [B, T, D]

_ATTENTION_PROJ = (QUERY_PROJ, KEY_PROJ, VALUE_PROJ, QKV_PROJ)
_ALL_PROJ = (*_ATTENTION_PROJ, OUT_PROJ, MLPWI_0, MLPWI_1, MLPWI, MLPWO)


class Remat(enum.StrEnum):
    """``model.remat``: see the module docstring. ``Remat(True)`` is ``FULL``, ``Remat(False)``
    ``NONE``."""

    NONE = "none"
    FULL = "full"
    MINIMAL = "minimal"
    SAVE_DOT_EXCEPT_MLP = "save_dot_except_mlp"
    SAVE_QKV_PROJ = "save_qkv_proj"
    SAVE_OUT_PROJ = "save_out_proj"
    OFFLOAD = "offload"

    @classmethod
    def _missing_(cls, value: Any):
        if value is True:
            return cls.FULL
        if value is False:
            return cls.NONE
        return None


def parse(value: Remat | str | bool, what: str = "remat") -> Remat:
    """``value`` as a :class:`Remat`; anything else is a ConfigError naming ``what`` and the
    policies."""
    return parse_enum(Remat, value, what)


def policy(remat: Remat | str | bool) -> Callable[..., Any] | None:
    """The :func:`jax.checkpoint` policy of ``remat`` (None for ``none``: no checkpoint)."""
    cp = jax.checkpoint_policies
    match parse(remat):
        case Remat.NONE:
            return None
        case Remat.FULL:
            return cp.nothing_saveable
        case Remat.MINIMAL:
            return cp.dots_with_no_batch_dims_saveable
        case Remat.SAVE_DOT_EXCEPT_MLP:
            return cp.save_only_these_names(*_ATTENTION_PROJ, OUT_PROJ)
        case Remat.SAVE_QKV_PROJ:
            return cp.save_only_these_names(*_ATTENTION_PROJ)
        case Remat.SAVE_OUT_PROJ:
            return cp.save_only_these_names(OUT_PROJ)
        case Remat.OFFLOAD:
            return cp.save_and_offload_only_these_names(
                names_which_can_be_saved=[], names_which_can_be_offloaded=list(_ALL_PROJ),
                offload_src="device", offload_dst="pinned_host")


def checkpoint(fn: Callable, remat: Remat | str | bool) -> Callable:
    """``fn`` (a scanned block body) under :func:`jax.checkpoint` with ``remat``'s policy;
    ``fn`` itself for ``none``."""
    p = policy(remat)
    return fn if p is None else jax.checkpoint(fn, policy=p)
