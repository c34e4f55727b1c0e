"""Token-level distillation losses between a student's and a teacher's next-token distributions.

Every loss is a function of ``(student_logits, teacher_logits)`` ``[B, T, V]`` per position,
reduced over a mask of predicted positions ``[B, T]`` into a *sum and a count* (so microbatches
and devices combine exactly, as the next-token NLL does) or a masked mean. Notation: ``p_T`` the
teacher's and ``p_S`` the student's distribution, both at temperature ``tau``
(``softmax(logits / tau)``):

* ``forward_kl``: ``KL(p_T || p_S)``
* ``reverse_kl``: ``KL(p_S || p_T)``
* ``jsd``: ``beta KL(p_T || M) + (1 - beta) KL(p_S || M)`` with ``M = beta p_T + (1 - beta) p_S``;
  TRL GKD's convention at the ends: ``beta = 0`` is forward KL and ``beta = 1`` reverse KL (the
  formula itself vanishes there)
* ``skew_forward_kl``: ``KL(p_T || lam p_T + (1 - lam) p_S)`` (DistiLLM's SKL, as a true KL)
* ``skew_reverse_kl``: ``KL(p_S || (1 - lam) p_T + lam p_S)`` (DistiLLM's SRKL)

times ``tau**2`` when ``scale_by_temperature`` (Hinton et al.; MaxText and EasyDeL do, TRL does
not), so gradients keep their size as ``tau`` grows.

Numerics: float32 throughout; log-probabilities from ``log_softmax``; mixtures in log space
(``logaddexp`` of log-weights plus log-probabilities, never the log of a sum of
probabilities); every ``p log(p / q)`` term is taken as 0 where ``p = 0``, so logits of +-1e4
give finite values and gradients. Vocabulary padding (logits past ``vocab_size``, e.g. a model
whose embedding is padded past its tokenizer) is excluded: those entries get a large finite
negative logit (probability exactly 0, gradient exactly 0).

Top-k (``top_k > 0``): the divergence is taken over *buckets*: the teacher's k most likely ids
(and with ``top_k_tail`` one more bucket holding the rest of each distribution's mass). Bucket
log-probabilities are formed at temperature 1 (the teacher's from its full softmax, the
student's from its full softmax at the same ids) and then divided by ``tau`` and renormalised,
so the same numbers come out whether the teacher's top-k is computed live or read from an
offline cache of ``(ids, log-probs)`` (see :mod:`jaxarith.distill.cache`). Without the tail
bucket the k-way distributions are the full ones renormalised over the k ids (at any ``tau``
this equals ``softmax(logits[ids] / tau)``); with ``k = V`` and no tail bucket the top-k loss
equals the full one.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxarith.errors import ConfigError

Array = jax.Array

# The logit given to excluded vocabulary entries: exp underflows to exactly 0 and every
# difference stays finite in float32 (unlike -inf, whose 0 * inf would be NaN).
NEG = -1e30


class LossKind(enum.StrEnum):
    FORWARD_KL = "forward_kl"
    REVERSE_KL = "reverse_kl"
    JSD = "jsd"
    SKEW_FORWARD_KL = "skew_forward_kl"
    SKEW_REVERSE_KL = "skew_reverse_kl"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillLoss:
    """Which divergence, at which temperature, mixed how with the next-token CE (hashable).

    Attributes:
      loss: one of :class:`LossKind`.
      temperature: ``tau > 0``, applied to both models' logits.
      scale_by_temperature: multiply the divergence by ``tau**2``.
      alpha: total loss ``alpha * distill + (1 - alpha) * CE``, ``alpha`` in ``[0, 1]``.
      beta: the JSD's mixture weight of the teacher, in ``[0, 1]``.
      lam: the skew KLs' skew, in ``[0, 1]``.
      top_k: 0 for the full vocabulary, else the number of teacher ids kept per position.
      top_k_tail: with ``top_k``: one more bucket holding the remaining mass.
    """

    loss: LossKind = LossKind.FORWARD_KL
    temperature: float = 1.0
    scale_by_temperature: bool = True
    alpha: float = 0.5
    beta: float = 0.5
    lam: float = 0.1
    top_k: int = 0
    top_k_tail: bool = False

    def __post_init__(self):
        try:
            object.__setattr__(self, "loss", LossKind(self.loss))
        except ValueError:
            raise ConfigError(f"distill.loss={self.loss!r}: unknown loss (expected one of "
                              f"{', '.join(k.value for k in LossKind)})") from None
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"distill.temperature={self.temperature} must be > 0")
        for name in ("alpha", "beta", "lam"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"distill.{name}={v} must be in [0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"distill.top_k={self.top_k} must be >= 0 (0: full vocabulary)")
        if self.top_k_tail and not self.top_k:
            raise ConfigError("distill.top_k_tail needs distill.top_k > 0")

    @property
    def scale(self) -> float:
        return self.temperature ** 2 if self.scale_by_temperature else 1.0

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse a ``top_k`` larger than the (real) vocabulary."""
        if self.top_k > vocab_size:
            raise ConfigError(f"distill.top_k={self.top_k} exceeds the vocabulary size "
                              f"{vocab_size}")


# ----------------------------------------------------------------------------- building blocks


def mask_vocab(logits: Array, vocab_size: int | None) -> Array:
    """Float32 logits with entries at ids ``>= vocab_size`` set to :data:`NEG` (excluded)."""
    logits = logits.astype(jnp.float32)
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    ids = jnp.arange(logits.shape[-1])
    return jnp.where(ids < vocab_size, logits, NEG)


def _kl_terms(logp: Array, logq: Array) -> Array:
    """``sum_i p_i (log p_i - log q_i)`` over the last axis, with ``0 log 0 = 0``."""
    p = jnp.exp(logp)
    return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def log_mix(logp: Array, logq: Array, w: float) -> Array:
    """``log(w p + (1 - w) q)`` computed in log space; exact at ``w`` in {0, 1}."""
    if w == 0.0:
        return logq
    if w == 1.0:
        return logp
    return jnp.logaddexp(logp + math.log(w), logq + math.log1p(-w))


def divergence(logp_s: Array, logp_t: Array, kind: LossKind, *, beta: float = 0.5,
               lam: float = 0.1) -> Array:
    """The divergence of one kind between normalised log-distributions ``[..., V]`` -> ``[...]``.

    Args:
      logp_s, logp_t: student / teacher log-probabilities (float32, already at temperature).
    """
    if kind is LossKind.FORWARD_KL:
        return _kl_terms(logp_t, logp_s)
    if kind is LossKind.REVERSE_KL:
        return _kl_terms(logp_s, logp_t)
    if kind is LossKind.JSD:
        if beta == 0.0:  # TRL GKD: the ends are the two KLs, not the (vanishing) JSD
            return _kl_terms(logp_t, logp_s)
        if beta == 1.0:
            return _kl_terms(logp_s, logp_t)
        log_m = log_mix(logp_t, logp_s, beta)
        return beta * _kl_terms(logp_t, log_m) + (1.0 - beta) * _kl_terms(logp_s, log_m)
    if kind is LossKind.SKEW_FORWARD_KL:
        return _kl_terms(logp_t, log_mix(logp_t, logp_s, lam))
    if kind is LossKind.SKEW_REVERSE_KL:
        return _kl_terms(logp_s, log_mix(logp_s, logp_t, lam))
    raise ConfigError(f"unknown distillation loss {kind!r}")


# ----------------------------------------------------------------------------- per position


def per_token(student_logits: Array, teacher_logits: Array, opts: DistillLoss,
              vocab_size: int | None = None) -> Array:
    """The distillation loss at every position: ``[B, T, V] x [B, T, V] -> [B, T]`` (float32).

    Uses the full vocabulary, or the teacher's top-k buckets when ``opts.top_k``. The teacher's
    logits are not differentiated (``stop_gradient``).
    """
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ConfigError(f"student vocabulary {student_logits.shape[-1]} != teacher vocabulary "
                          f"{teacher_logits.shape[-1]}")
    if opts.top_k:
        return per_token_topk(student_logits, teacher_topk(teacher_logits, opts.top_k, vocab_size),
                              opts, vocab_size)
    tau = opts.temperature
    logp_s = jax.nn.log_softmax(mask_vocab(student_logits, vocab_size) / tau, axis=-1)
    logp_t = jax.nn.log_softmax(mask_vocab(teacher_logits, vocab_size) / tau, axis=-1)
    return opts.scale * divergence(logp_s, logp_t, opts.loss, beta=opts.beta, lam=opts.lam)


class TopK(NamedTuple):
    """The teacher at one set of positions, as the top-k losses need it (and the cache stores).

    Attributes:
      ids: ``[..., k]`` int32, the teacher's k most likely ids (descending).
      logp: ``[..., k]`` float32, their log-probabilities at temperature 1 (full softmax).
      rest: ``[...]`` float32, the log of the teacher's remaining mass (a logsumexp over the other
        ids, so it stays accurate when the top-k hold nearly all the mass; :data:`NEG`-scale
        when nothing remains).
    """

    ids: Array
    logp: Array
    rest: Array


def teacher_topk(teacher_logits: Array, k: int, vocab_size: int | None = None) -> TopK:
    """The teacher's top-k ids, their log-probabilities and its remaining log-mass."""
    v = teacher_logits.shape[-1]
    v = v if vocab_size is None else min(vocab_size, v)
    if k > v:
        raise ConfigError(f"distill.top_k={k} exceeds the vocabulary size {v}")
    logp = jax.nn.log_softmax(mask_vocab(jax.lax.stop_gradient(teacher_logits), vocab_size), -1)
    top, ids = jax.lax.top_k(logp, k)
    return TopK(ids.astype(jnp.int32), top, _rest(logp, ids))


def _rest(logp_full: Array, ids: Array) -> Array:
    """``log sum_{i not in ids} p_i`` by a logsumexp over the other entries (no cancellation)."""
    inside = _scatter_mask(ids, logp_full.shape[-1])
    return jax.nn.logsumexp(jnp.where(inside, NEG, logp_full), axis=-1)


def per_token_topk(student_logits: Array, teacher: TopK, opts: DistillLoss,
                   vocab_size: int | None = None) -> Array:
    """The top-k loss at every position from the teacher's :class:`TopK` ``[B, T, k]``.

    The student's bucket log-probabilities are its full log-softmax (temperature 1) at the
    teacher's ids, plus (``top_k_tail``) the log of its mass outside them; both sides are then
    divided by ``tau`` and renormalised over the buckets.
    """
    ids = teacher.ids
    t_k = jax.lax.stop_gradient(teacher.logp.astype(jnp.float32))
    logp_s_full = jax.nn.log_softmax(mask_vocab(student_logits, vocab_size), axis=-1)
    s_k = jnp.take_along_axis(logp_s_full, ids, axis=-1)
    if opts.top_k_tail:
        t_rest = jax.lax.stop_gradient(teacher.rest.astype(jnp.float32))
        s_k = jnp.concatenate([s_k, _rest(logp_s_full, ids)[..., None]], axis=-1)
        t_k = jnp.concatenate([t_k, t_rest[..., None]], axis=-1)
    tau = opts.temperature
    logp_s = jax.nn.log_softmax(s_k / tau, axis=-1)
    logp_t = jax.nn.log_softmax(t_k / tau, axis=-1)
    return opts.scale * divergence(logp_s, logp_t, opts.loss, beta=opts.beta, lam=opts.lam)


def _scatter_mask(ids: Array, size: int) -> Array:
    """Boolean ``[..., size]``, True at ``ids [..., k]``."""
    flat = ids.reshape(-1, ids.shape[-1])
    rows = jax.vmap(lambda i: jnp.zeros((size,), bool).at[i].set(True))(flat)
    return rows.reshape(*ids.shape[:-1], size)


# ----------------------------------------------------------------------------- reductions


def masked_sum(values: Array, mask: Array | None) -> tuple[Array, Array]:
    """``(sum(values * mask), sum(mask))`` in float32 (mask: 0/1 or weights, ``[B, T]``)."""
    values = values.astype(jnp.float32)
    w = jnp.ones(values.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(jnp.where(w != 0, values * w, 0.0)), jnp.sum(w)


def masked_mean(values: Array, mask: Array | None) -> Array:
    """Mean over the masked positions (0 when there are none)."""
    total, count = masked_sum(values, mask)
    return total / jnp.maximum(count, 1.0)


def _named(kind: LossKind):
    def fn(student_logits: Array, teacher_logits: Array, mask: Array | None = None, *,
           temperature: float = 1.0, scale_by_temperature: bool = True, beta: float = 0.5,
           lam: float = 0.1, top_k: int = 0, top_k_tail: bool = False,
           vocab_size: int | None = None) -> Array:
        opts = DistillLoss(loss=kind, temperature=temperature,
                           scale_by_temperature=scale_by_temperature, beta=beta, lam=lam,
                           top_k=top_k, top_k_tail=top_k_tail)
        return masked_mean(per_token(student_logits, teacher_logits, opts, vocab_size), mask)

    fn.__name__ = kind.value
    fn.__doc__ = (f"Masked mean of the ``{kind.value}`` loss over positions (see the module "
                  "table); ``mask`` [B, T] of predicted positions, ``vocab_size`` the real "
                  "vocabulary (logits past it are excluded).")
    return fn


forward_kl = _named(LossKind.FORWARD_KL)
reverse_kl = _named(LossKind.REVERSE_KL)
jsd = _named(LossKind.JSD)
skew_forward_kl = _named(LossKind.SKEW_FORWARD_KL)
skew_reverse_kl = _named(LossKind.SKEW_REVERSE_KL)


def next_token_ce(student_logits: Array, targets: Array,
                  vocab_size: int | None = None) -> Array:
    """``-log p_S(target)`` per position ``[B, T]`` (temperature 1, padding excluded)."""
    logp = jax.nn.log_softmax(mask_vocab(student_logits, vocab_size), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def total_sums(student_logits: Array, teacher: Array | TopK, targets: Array,
               mask: Array | None, opts: DistillLoss, vocab_size: int | None = None
               ) -> tuple[Array, Array, dict]:
    """The training objective as sums: ``(loss_sum, count, metrics)``.

    ``loss_sum = alpha * distill_sum + (1 - alpha) * ce_sum``; ``metrics`` holds the sums of
    ``distill_loss``, ``ce`` and ``kl_t1`` (forward KL at temperature 1, unscaled, over the same
    vocabulary or buckets: comparable across runs whatever the loss and temperature).

    Args:
      student_logits: ``[B, T, V]`` at the positions that predict ``targets``.
      teacher: the teacher's logits ``[B, T, V]``, or its :class:`TopK` (from an offline cache;
        needs ``opts.top_k``).
      targets: ``[B, T]`` next tokens (for the CE).
      mask: ``[B, T]`` weights of predicted positions.
    """
    if not isinstance(teacher, TopK) and opts.top_k:
        teacher = teacher_topk(teacher, opts.top_k, vocab_size)
    if isinstance(teacher, TopK):
        if not opts.top_k:
            raise ConfigError("teacher top-k entries given but distill.top_k is 0")
        d = per_token_topk(student_logits, teacher, opts, vocab_size)
        kl1 = per_token_topk(student_logits, teacher,
                             dataclasses.replace(_KL_T1, top_k=opts.top_k,
                                                 top_k_tail=opts.top_k_tail), vocab_size)
    else:
        d = per_token(student_logits, teacher, opts, vocab_size)
        kl1 = per_token(student_logits, teacher, _KL_T1, vocab_size)
    ce = next_token_ce(student_logits, targets, vocab_size)
    d_sum, count = masked_sum(d, mask)
    ce_sum, _ = masked_sum(ce, mask)
    kl_sum, _ = masked_sum(jax.lax.stop_gradient(kl1), mask)
    loss_sum = opts.alpha * d_sum + (1.0 - opts.alpha) * ce_sum
    return loss_sum, count, {"distill_loss": d_sum, "ce": ce_sum, "kl_t1": kl_sum}


_KL_T1 = DistillLoss(loss=LossKind.FORWARD_KL, temperature=1.0)
