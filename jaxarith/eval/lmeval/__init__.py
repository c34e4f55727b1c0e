"""lm-evaluation-harness integration: jaxarith models and combinations as ``model="jaxarith"``.

Importing this package registers :class:`~jaxarith.eval.lmeval.lm.JaxarithLM` in lm-eval's model
registry under the name ``jaxarith``, so both of these work::

    import jaxarith.eval.lmeval, lm_eval
    lm_eval.simple_evaluate(model="jaxarith", model_args="pretrained=DIR,mesh=fsdp=-1", ...)

    jaxarith lm-eval DIR --tasks jaxarith_mc

``lm_eval.models`` is imported first: lm-eval fills its registry with the built-in backends
(``hf``, ``vllm`` ...) only while the registry is empty, so registering before that would hide
``model="hf"``. Needs the ``eval`` extra (``pip install jaxarith[eval]``).
"""

from __future__ import annotations

try:
    import lm_eval.models  # noqa: F401  (fills the built-in registry first; see above)
    from lm_eval.api.registry import model_registry, register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    from jaxarith.errors import JaxarithError

    raise JaxarithError("the lm-eval integration needs lm-evaluation-harness: "
                        "pip install 'jaxarith[eval]'") from e

import logging  # noqa: E402

from jaxarith.eval.lmeval.lm import JaxarithLM  # noqa: E402

MODEL_NAME = "jaxarith"


def _drop_shipped_task_advice(record: logging.LogRecord) -> bool:
    """lm-eval advises ``--metadata`` for every task with a ``custom_dataset``; the shipped
    tasks take none, so their copy of the advice is noise."""
    msg = record.getMessage()
    return not (msg.startswith("jaxarith_") and "Custom kwargs can be passed" in msg)


logging.getLogger("lm_eval.api.task").addFilter(_drop_shipped_task_advice)

if MODEL_NAME not in model_registry:  # a second import (e.g. importlib.reload) is a no-op
    register_model(MODEL_NAME)(JaxarithLM)

__all__ = ["JaxarithLM", "MODEL_NAME"]
