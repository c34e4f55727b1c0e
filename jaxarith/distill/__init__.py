"""Distillation: token-level losses and the offline teacher cache.

- ``losses``: forward/reverse KL with temperature, JSD, skew KL, top-k with a tail bucket, as
  functions of ``(student_logits, teacher_logits, mask, temperature)``;
- ``cache``: ``jaxarith distill cache``: a teacher's top-k log-probabilities written once, read by
  training instead of running the teacher.
"""

from jaxarith.distill.losses import DistillLoss, LossKind, TopK, per_token, per_token_topk

__all__ = ["DistillLoss", "LossKind", "TopK", "per_token", "per_token_topk"]
