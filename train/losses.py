"""Training losses of the families whose loss is more than next-token NLL.

:func:`packed_fields` picks a batch's packed-document fields for the forward of every loss.
A mixture-of-experts family (``Family.routed``: its blocks return router logits as the forward's
``aux``) trains on NLL plus the router losses of :mod:`jaxarith.models.moe`; the models package
itself knows nothing of training (train/step.py picks the loss).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxarith.errors import ConfigError
from jaxarith.models import moe, transformer
from jaxarith.models.remat import Remat


def packed_fields(batch: dict) -> dict:
    """``{"segment_ids", "positions"}`` of a batch of packed documents (``data.packing:
    documents``), as keyword arguments of :func:`jaxarith.models.transformer.forward`; ``{}``
    for streamed windows (the forward then sees exactly what it saw before packing existed)."""
    if "segment_ids" not in batch:
        return {}
    return {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoESection:
    """Router loss coefficients (see the module docstring)."""

    z_loss: float = 0.0
    aux_loss_coef: float | None = None

    def __post_init__(self):
        if self.z_loss < 0 or (self.aux_loss_coef is not None and self.aux_loss_coef < 0):
            raise ConfigError(f"moe: z_loss={self.z_loss} and aux_loss_coef="
                              f"{self.aux_loss_coef} must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.z_loss > 0 or self.aux_loss_coef is not None


def moe_loss_fn(cfg, *, dtype=jnp.float32, remat: Remat | str | bool = False,
                aux_coef: float | None = None, z_coef: float = 0.0, attention: str = "xla"):
    """The training loss of a mixture-of-experts model in train/step.py's interface.

    ``loss_sum = nll + count * (aux_coef * aux + z_coef * z)`` where ``aux`` is
    :func:`jaxarith.models.moe.load_balancing_loss` (default coefficient: the config's
    ``router_aux_loss_coef``) and ``z`` :func:`~jaxarith.models.moe.router_z_loss`, both over
    the microbatch's tokens; metrics ``aux_loss``, ``z_loss`` and ``expert_load/<i>`` (share
    of the top-k choices taken by expert i, pooled over layers), each times ``count`` as the
    interface wants (the step divides by the total count, so with microbatches they are
    count-weighted means of per-microbatch values: exact for one microbatch, as transformers
    computes them per batch).
    """
    coef = cfg.router_aux_loss_coef if aux_coef is None else aux_coef
    k = cfg.num_experts_per_tok

    def loss(params, frozen, batch):
        del frozen
        tokens = batch["tokens"]
        mask = jnp.ones(tokens.shape, bool)
        logits, _, router = transformer.forward(params, cfg, tokens, attention_mask=mask,
                                                dtype=dtype, remat=remat,
                                                attention=attention, **packed_fields(batch))
        nll, count = transformer.nll_from_logits(logits, tokens, mask, batch.get("weights"))
        aux = moe.load_balancing_loss(router, k, mask)
        z = moe.router_z_loss(router, mask)
        f, _ = moe.expert_fractions(router, k, mask)
        metrics = {"aux_loss": aux * count, "z_loss": z * count}
        metrics.update({f"expert_load/{i}": f[i] / k * count for i in range(f.shape[0])})
        return nll + count * (coef * aux + z_coef * z), count, metrics

    return loss
