"""The ``moe:`` train-config section: router loss coefficients of mixture-of-experts models.

::

    moe:
      z_loss: 0.001          # router z-loss coefficient (ST-MoE); default 0
      aux_loss_coef: 0.01    # load-balancing loss coefficient; default: router_aux_loss_coef
                             # of the model's config (transformers' default 0.001)

Without the section a Mixtral still trains with its load-balancing loss at the config's
coefficient and no z-loss (:func:`train.losses.moe_loss_fn`); the
metrics ``aux_loss``, ``z_loss`` and ``expert_load/<i>`` are logged either way. The section only
changes the coefficients, so it cannot be combined with another loss (distillation): that is an
error.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxarith.errors import ConfigError
from train import losses
from train.extensions import Extension


def extension(cfg) -> Extension | None:
    """The MoE loss with the section's coefficients, when the section sets any."""
    sec = cfg.moe
    if not sec.enabled:
        return None

    def loss(model_cfg, *, dtype=jnp.float32, remat=False, attention="xla"):
        if not hasattr(model_cfg, "num_local_experts"):
            raise ConfigError(f"moe: the section needs a mixture-of-experts model, the model is "
                              f"a dense {model_cfg.model_type}")
        return losses.moe_loss_fn(model_cfg, dtype=dtype, remat=remat, attention=attention,
                              aux_coef=sec.aux_loss_coef, z_coef=sec.z_loss)

    return Extension(name="moe", loss=loss, loss_key=sec)
