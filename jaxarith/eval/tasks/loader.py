"""The ``custom_dataset`` of the shipped task YAMLs: a jsonl next to this file as a test split.

lm-eval calls ``custom_dataset(**metadata, **dataset_kwargs)``; a relative ``data_file`` is
resolved against this directory (not the working directory), so the tasks run from anywhere.
Copy this file next to your own YAMLs to use the same pattern (see docs/lmeval.md).
"""

from __future__ import annotations

import json
import os


def load(data_file: str, split: str = "test", **_metadata):
    """A ``datasets.DatasetDict`` with one split read from ``data_file`` (one JSON per line)."""
    import datasets

    path = data_file if os.path.isabs(data_file) else \
        os.path.join(os.path.dirname(os.path.abspath(__file__)), data_file)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
