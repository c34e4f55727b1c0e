"""Averaging parameters: during training (EMA, SWA, LaWA) and after it (uniform and greedy soups).

- ``averagers``: immutable pytree dataclasses with ``init`` / pure ``update`` / ``value``, and
  their configs (the ``average:`` section of a training config);
- ``soups``: ``jaxarith average``: the streamed mean of checkpoints, LaWA over a run's latest k,
  greedy soups scored on held-out data;
- ``runs``: reading a training run directory's checkpoints as averaging inputs.
"""

from jaxarith.average.averagers import (
    EMA,
    SWA,
    AverageConfig,
    Averager,
    EMAConfig,
    LaWA,
    LaWAConfig,
    NoAverage,
    SWAConfig,
    make_averager,
)

__all__ = ["EMA", "SWA", "AverageConfig", "Averager", "EMAConfig", "LaWA", "LaWAConfig",
           "NoAverage", "SWAConfig", "make_averager"]
