"""Distillation in the training program: the ``distill:`` config section, the teacher, the loss.

A run distils when ``distill.teacher`` (a live teacher: any model reference) or ``distill.cache``
(an offline top-k cache written by ``jaxarith distill cache``) is set::

    distill:
      teacher: path/to/teacher        # HF hub id, HF directory or jaxarith Orbax directory
      loss: forward_kl                # reverse_kl | jsd | skew_forward_kl | skew_reverse_kl
      temperature: 1.0
      scale_by_temperature: true      # times tau^2 (MaxText, EasyDeL); TRL GKD does not
      alpha: 0.5                      # alpha * distill + (1 - alpha) * next-token CE
      beta: 0.5                       # jsd
      lam: 0.1                        # skew KLs
      top_k: 0                        # 0: full vocabulary
      top_k_tail: false
      teacher_dtype: float32          # or bfloat16 (teacher weights and forward)

The live teacher is loaded once, onto the same mesh by the same logical-axis rules as the
student, and held in the train state's ``frozen`` tree (``frozen["distill"]``): it is an input of
the compiled step, never differentiated (``stop_gradient``), never in the optimizer state and
never in checkpoints (on resume it is loaded again from ``distill.teacher``). Its forward pass
runs inside the same jitted step as the student's. Teacher and student may differ in depth,
width and architecture, but must share the vocabulary (checked from the configs before anything
is loaded or compiled).

The step logs ``distill_loss``, ``ce`` and ``kl_t1`` (forward KL at temperature 1, comparable
across runs) beside ``loss``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxarith.distill import cache as distill_cache
from jaxarith.distill import losses as D
from jaxarith.errors import ConfigError
from jaxarith.io.refs import load_model
from jaxarith.models import transformer
from jaxarith.models.config import ModelConfig
from jaxarith.models.remat import Remat
from train.losses import packed_fields

NAME = "distill"  # the teacher's key in the state's ``frozen`` tree
CACHE_FIELDS = ("teacher_ids", "teacher_logp", "teacher_rest")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillSection:
    """The ``distill:`` section of a train config (see the module docstring).

    Attributes:
      teacher: a model reference for a live teacher (empty: none).
      cache: an offline top-k cache directory (``jaxarith distill cache``) instead of a live
        teacher; its ``k`` becomes ``top_k``.
      loss, temperature, scale_by_temperature, alpha, beta, lam, top_k, top_k_tail: see
        :class:`jaxarith.distill.losses.DistillLoss`.
      teacher_dtype: float32 | bfloat16: the live teacher's weights and forward.
    """

    teacher: str = ""
    cache: str = ""
    loss: str = "forward_kl"
    temperature: float = 1.0
    scale_by_temperature: bool = True
    alpha: float = 0.5
    beta: float = 0.5
    lam: float = 0.1
    top_k: int = 0
    top_k_tail: bool = False
    teacher_dtype: str = "float32"

    def __post_init__(self):
        if self.teacher and self.cache:
            raise ConfigError("distill: give distill.teacher (live) or distill.cache "
                              "(offline), not both")
        if self.teacher_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"distill.teacher_dtype={self.teacher_dtype!r}: expected "
                              "float32 or bfloat16")
        self.opts()  # validates the loss options

    @property
    def enabled(self) -> bool:
        return bool(self.teacher or self.cache)

    def opts(self, top_k: int | None = None) -> D.DistillLoss:
        """The loss options (``top_k`` overridden, e.g. by a cache's k)."""
        return D.DistillLoss(loss=self.loss, temperature=self.temperature,
                             scale_by_temperature=self.scale_by_temperature, alpha=self.alpha,
                             beta=self.beta, lam=self.lam,
                             top_k=self.top_k if top_k is None else top_k,
                             top_k_tail=self.top_k_tail)


# ----------------------------------------------------------------------------- teacher


teacher_config = distill_cache.teacher_config  # the teacher's config, no weights loaded


def check_vocab(student_cfg: ModelConfig, teacher_cfg: ModelConfig, teacher_ref: str = "",
                vocab_size: int | None = None, top_k: int = 0) -> None:
    """Refuse (before any compile) a teacher whose embedding table cannot hold the tokenizer's
    tokens, or a ``top_k`` beyond the real vocabulary.

    Tables padded to different sizes (one tokenizer, e.g. Qwen2.5-0.5B and 7B) are distilled
    over the tokenizer's ``vocab_size`` rows; without ``vocab_size`` they must be equal.
    """
    if teacher_cfg.vocab_size != student_cfg.vocab_size:
        if vocab_size is None:
            raise ConfigError(
                f"distill.teacher {teacher_ref or ''}: the teacher's vocabulary has "
                f"{teacher_cfg.vocab_size} entries but the student's has "
                f"{student_cfg.vocab_size}; give the tokenizer's size to distill over its rows")
        small = min(teacher_cfg.vocab_size, student_cfg.vocab_size)
        if vocab_size > small:
            who = "teacher's" if teacher_cfg.vocab_size == small else "student's"
            raise ConfigError(
                f"distill.teacher {teacher_ref or ''}: the tokenizer has {vocab_size} tokens but "
                f"the {who} embedding table has {small} rows")
    real = student_cfg.vocab_size if vocab_size is None else vocab_size
    if top_k > real:
        raise ConfigError(f"distill.top_k={top_k} exceeds the vocabulary size {real}")


def load_teacher(ref: str, teacher_cfg: ModelConfig, mesh, dtype: str = "float32",
                 progress: bool = False):
    """The teacher's parameters in ``dtype``, sharded on ``mesh`` by the logical-axis rules."""
    loaded = load_model(ref, mesh=mesh, dtype=jnp.dtype(dtype), progress=progress)
    if loaded.config != teacher_cfg:
        raise ConfigError(f"distill.teacher {ref}: its config changed while loading")
    return loaded.params


def teacher_shardings(teacher_cfg: ModelConfig, mesh):
    return transformer.param_shardings(teacher_cfg, mesh)


def abstract_teacher(teacher_cfg: ModelConfig, mesh, dtype: str = "float32"):
    """The teacher as ``jax.ShapeDtypeStruct`` leaves with shardings (no memory)."""
    return transformer.abstract_params(teacher_cfg, jnp.dtype(dtype), mesh)


# ----------------------------------------------------------------------------- loss


def cache_batch_fields(k: int) -> dict:
    """The batch fields a cached-teacher run reads (``name -> (trailing shape, dtype)``)."""
    return {"teacher_ids": ((k,), "int32"), "teacher_logp": ((k,), "float32"),
            "teacher_rest": ((), "float32")}


def make_loss_fn(student_cfg: ModelConfig, opts: D.DistillLoss, *,
                 teacher_cfg: ModelConfig | None = None, cached: bool = False,
                 vocab_size: int | None = None, dtype=jnp.float32,
                 teacher_dtype=jnp.float32, remat: Remat | str | bool = False,
                 attention: str = "xla"):
    """``loss_fn(params, frozen, batch) -> (loss_sum, count, metrics)`` for the train step.

    The student's logits at positions ``0..T-2`` predict tokens ``1..T-1``; the teacher's
    distribution at the same positions comes from its forward pass over the same tokens
    (``frozen["distill"]``, live) or from the batch's cached top-k fields (``cached``).
    ``batch["weights"]`` (loss weights of target tokens), when present, weighs both the
    distillation and the CE terms.

    Args:
      vocab_size: the real vocabulary (logits past it, e.g. embedding padding, are excluded).
    """
    if not cached and teacher_cfg is None:
        raise ConfigError("a live distillation loss needs the teacher's config")
    if cached and not opts.top_k:
        raise ConfigError("a cached teacher needs top_k > 0")
    # tables padded to different sizes: both cut to the narrower (its extra rows are beyond
    # ``vocab_size``, which check_vocab requires of different sizes)
    width = student_cfg.vocab_size if cached else min(student_cfg.vocab_size,
                                                       teacher_cfg.vocab_size)

    def loss_fn(params, frozen, batch):
        tokens = batch["tokens"]
        packed = packed_fields(batch)
        logits, _, _ = transformer.forward(params, student_cfg, tokens, dtype=dtype, remat=remat,
                                           attention=attention, **packed)
        weight = jnp.ones(tokens[:, 1:].shape, jnp.float32)
        if batch.get("weights") is not None:
            weight = weight * batch["weights"][:, 1:].astype(jnp.float32)
        if cached:
            teacher = D.TopK(batch["teacher_ids"][:, :-1], batch["teacher_logp"][:, :-1],
                             batch["teacher_rest"][:, :-1])
        else:
            t_params = jax.lax.stop_gradient(frozen[NAME])
            t_logits, _, _ = transformer.forward(t_params, teacher_cfg, tokens,
                                                 dtype=teacher_dtype, attention=attention,
                                                 **packed)
            teacher = jax.lax.stop_gradient(t_logits[:, :-1, :width])
        return D.total_sums(logits[:, :-1, :width], teacher, tokens[:, 1:], weight, opts,
                            vocab_size)

    return loss_fn
