"""Offline lm-evaluation-harness tasks shipped with jaxarith (task YAMLs over bundled jsonl).

``TASKS_DIR`` is the ``--include-path`` that ``jaxarith lm-eval`` adds by default. The tasks:

- ``jaxarith_mc``: multiple choice (paragraph continuations from the bundled docs corpus);
- ``jaxarith_ppl``: rolling perplexity of bundled code paragraphs;
- ``jaxarith_gen``: generation ("Which module defines X?" from the instruction eval split);
- the group ``jaxarith_offline`` runs all three.

The data is built by ``scripts/make_evaltasks.py``; each YAML loads its jsonl with
:func:`jaxarith.eval.tasks.loader.load` so the tasks work from any working directory.
"""

from __future__ import annotations

import os

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))
TASK_NAMES = ("jaxarith_mc", "jaxarith_ppl", "jaxarith_gen")
