"""Logit arithmetic presets: proxy tuning, emulated fine-tuning (EFT), reward interpolation.

Every preset is a tuple of weighted :class:`~jaxarith.decode.loop.Member` s for the product of
experts that :func:`jaxarith.decode.loop.combine` computes, ``log p = log_softmax(sum_i w_i
log_softmax(z_i))``:

- proxy tuning (Liu et al. 2024): ``s = s_base + alpha * (s_expert - s_anti)``
- EFT (Mitchell et al. 2023): ``s = s_model + beta * (s_tuned - s_ref)``; up-scaling: model =
  large base, tuned / ref = small tuned / small base; down-scaling: model = small base,
  tuned / ref = large tuned / large base
- reward interpolation: ``s = s_base + beta * (lam * s_tuned1 + (1 - lam) * s_tuned2 - s_ref)``

Generate with :func:`jaxarith.decode.loop.generate` (``DecodeSpec(members=preset, ...)``), or
speculatively with :mod:`jaxarith.decode.speculative` (whose names are re-exported here).
"""

from __future__ import annotations

from jaxarith.decode.loop import Member
from jaxarith.models.family import ModelConfig

# ----------------------------------------------------------------------------- presets


def proxy_tuning(base: ModelConfig, expert: ModelConfig, anti_expert: ModelConfig,
                 alpha: float = 1.0) -> tuple[Member, ...]:
    """Proxy tuning: ``base + alpha * (expert - anti_expert)`` (members in that order)."""
    return (Member(base, 1.0, "base"), Member(expert, alpha, "expert"),
            Member(anti_expert, -alpha, "anti_expert"))


def eft(model: ModelConfig, tuned: ModelConfig, reference: ModelConfig,
        beta: float = 1.0) -> tuple[Member, ...]:
    """Emulated fine-tuning: ``model + beta * (tuned - reference)`` (members in that order)."""
    return (Member(model, 1.0, "model"), Member(tuned, beta, "tuned"),
            Member(reference, -beta, "reference"))


def members_for(mode: str, configs, *, alpha: float = 1.0,
                beta: float = 1.0) -> tuple[Member, ...]:
    """The members of a ``generate`` / ``lm-eval`` combination: ``mode`` ``"single"`` (one
    model), ``"proxy"`` (``configs`` = base, expert, anti-expert) or ``"eft"`` (model, tuned,
    reference)."""
    if mode == "proxy":
        return proxy_tuning(*configs, alpha=alpha)
    if mode == "eft":
        return eft(*configs, beta=beta)
    return (Member(configs[0]),)


def eft_up(large_base: ModelConfig, small_tuned: ModelConfig, small_base: ModelConfig,
           beta: float = 1.0) -> tuple[Member, ...]:
    """EFT up-scaling: a large base model steered by the small models' fine-tuning reward."""
    return (Member(large_base, 1.0, "large_base"), Member(small_tuned, beta, "small_tuned"),
            Member(small_base, -beta, "small_base"))


def eft_down(small_base: ModelConfig, large_tuned: ModelConfig, large_base: ModelConfig,
             beta: float = 1.0) -> tuple[Member, ...]:
    """EFT down-scaling: a small base model with the large models' fine-tuning reward."""
    return (Member(small_base, 1.0, "small_base"), Member(large_tuned, beta, "large_tuned"),
            Member(large_base, -beta, "large_base"))


def reward_interpolation(base: ModelConfig, tuned1: ModelConfig, tuned2: ModelConfig,
                         reference: ModelConfig, lam: float = 0.5,
                         beta: float = 1.0) -> tuple[Member, ...]:
    """EFT reward interpolation: ``base + beta * (lam * r1 + (1 - lam) * r2)`` with
    ``r_i = tuned_i - reference`` (members: base, tuned1, tuned2, reference)."""
    return (Member(base, 1.0, "base"), Member(tuned1, beta * lam, "tuned1"),
            Member(tuned2, beta * (1.0 - lam), "tuned2"), Member(reference, -beta, "reference"))


__all__ = ["proxy_tuning", "eft", "eft_up", "eft_down", "reward_interpolation"]
