"""The ``init:`` section as a training extension: the model config and start weights come from
``init.ref`` transformed by ``init.method`` (layer inheritance; see :mod:`train.init`)."""

from __future__ import annotations

from train.extensions import Extension
from train.init import start_config, start_params


def extension(cfg) -> Extension | None:
    if not cfg.init.enabled:
        return None

    return Extension(
        name="init",
        model=lambda c: start_config(c.init),
        init_params=lambda c, model_cfg, mesh: start_params(
            c.init, mesh, c.seed, progress=c.log.progress),
    )
