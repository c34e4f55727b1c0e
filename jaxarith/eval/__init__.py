"""Evaluation: held-out loss, instruction evals and lm-evaluation-harness.

- ``loss``: :func:`eval_loss`, per-token loss and perplexity of a text in windows (jitted, sharded);
- ``instruct``: the instruction eval of the experiments (answer-only NLL, exact match);
- ``lmeval``: ``model="jaxarith"`` for lm-eval (import it to register; needs the ``eval`` extra);
- ``tasks``: the offline lm-eval tasks shipped as package data.
"""

from jaxarith.eval.loss import LossResult, eval_loss

__all__ = ["LossResult", "eval_loss"]
