"""Training checkpoints with orbax-checkpoint's v1 training ``Checkpointer`` (tested with
0.12.8, the lock's version; the range allows < 0.13).

One checkpoint per saved step under ``DIR/<step>/`` holds three checkpointables:

* ``state``: the :class:`~train.step.TrainState` (params, optimizer state, average, step) without
  its ``frozen`` trees (a distillation teacher is an input, not training state: it is not
  written, and the caller re-supplies it to :meth:`Checkpoints.restore`), restored onto the
  current mesh from an abstract tree of ``jax.ShapeDtypeStruct(..., sharding=...)``, so a run may
  resume on a different mesh;
* ``data``: the data iterator's state (``{"next_index": k}``), so the resumed run sees exactly the
  batches the uninterrupted run would have;
* ``meta``: the run's config (JSON) and the metrics of that step.

Saves are asynchronous (the next steps run while the arrays are written) and only the last
``keep`` checkpoints are preserved. A checkpoint appears only when complete (orbax writes to a
temporary directory and commits it), so an interrupted save never looks like a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any

import orbax.checkpoint as ocp

from jaxarith.errors import CheckpointError, innermost_cause

log = logging.getLogger(__name__)

# Known-harmless messages orbax logs (through absl) at every save; they would also break the
# progress bar. "Skipping merge of OCDBT checkpoints": a single-process save has no
# per-process subdirectories to merge.
HARMLESS = ("Skipping merge of OCDBT checkpoints",)


class _Harmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(h in msg for h in HARMLESS)


logging.getLogger("absl").addFilter(_Harmless())


class Checkpoints:
    """Save and restore train checkpoints in ``directory``, keeping the last ``keep``.

    Use as a context manager (waits for pending saves and closes on exit)::

        with Checkpoints(out + "/checkpoints", keep=2) as ckpts:
            if ckpts.latest_step() is not None:
                state, data_state, meta = ckpts.restore(abstract_state)
            ...
            ckpts.save(step, state, data_state, meta)
    """

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        if keep < 1:
            raise CheckpointError(f"checkpoint.keep={keep} must be at least 1")
        # a URL (gs://...) goes to orbax as it is
        self.directory = directory if "://" in os.fspath(directory) else \
            os.path.abspath(directory)
        self.async_save = async_save
        policies = ocp.v1.training.preservation_policies
        self._policy = policies.LatestN(keep)
        self._ckpt = ocp.v1.training.Checkpointer(self.directory,
                                                  preservation_policy=self._policy)

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def latest_step(self) -> int | None:
        latest = self._ckpt.latest
        return None if latest is None else int(latest.step)

    def steps(self) -> list[int]:
        return sorted(int(c.step) for c in self._ckpt.checkpoints)

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """Save (asynchronously unless ``async_save`` is off); an existing step is kept."""
        if step in self.steps():
            return
        items = {"state": _without_frozen(state), "data": dict(data_state),
                 "meta": {"json": json.dumps(meta, sort_keys=True)}}
        if self.async_save:
            self._ckpt.save_checkpointables_async(step, items, force=True)
        else:
            self._ckpt.save_checkpointables(step, items, force=True)
        log.info("checkpoint: saving step %d to %s", step, self.directory)

    def restore(self, abstract_state: Any, step: int | None = None, *, frozen: Any = None):
        """Restore (state, data_state, meta) of ``step`` (default: the latest).

        Args:
          abstract_state: the state as ``jax.ShapeDtypeStruct`` leaves with shardings (its
            ``frozen`` part is ignored: frozen trees are not in checkpoints).
          frozen: the frozen trees to put back into the restored state (default ``{}``).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        try:
            out = self._ckpt.load_checkpointables(
                step, {"state": _without_frozen(abstract_state), "data": None, "meta": None})
        except Exception as e:  # orbax raises many types; name the checkpoint at fault
            raise CheckpointError(f"{self.directory}/{step}: cannot restore the train state "
                                  f"({_cause(e)})") from e
        meta = json.loads(out["meta"]["json"])
        state = out["state"]
        if dataclasses.is_dataclass(state) and hasattr(state, "frozen"):
            state = dataclasses.replace(state, frozen={} if frozen is None else frozen)
        return state, dict(out["data"]), meta

    def read_meta(self, step: int | None = None) -> dict:
        """The ``meta`` of ``step`` (default: the latest) without reading the arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint")
        try:
            out = self._ckpt.load_checkpointables(step, {"meta": None})
        except Exception as e:
            raise CheckpointError(f"{self.directory}/{step}: cannot read its metadata "
                                  f"({_cause(e)})") from e
        return json.loads(out["meta"]["json"])

    def newest_meta(self) -> tuple[int, dict, list[str]] | None:
        """(step, meta, why each newer checkpoint is unreadable) of the newest checkpoint whose
        metadata reads; None without any."""
        skipped = []
        for step in reversed(self.steps()):
            try:
                return step, self.read_meta(step), skipped
            except CheckpointError as e:
                skipped.append(str(e))
        return None

    def restore_newest(self, abstract_state: Any, *, frozen: Any = None):
        """:meth:`restore` of the newest checkpoint that restores, setting aside (renaming to
        ``unreadable-STEP``) the newer ones that do not, each reported on stderr.

        Returns:
          (step, state, data_state, meta).
        Raises:
          CheckpointError: no checkpoint restores (naming why the newest does not).
        """
        errors = []
        for step in reversed(self.steps()):
            try:
                state, data_state, meta = self.restore(abstract_state, step, frozen=frozen)
            except CheckpointError as e:
                errors.append((step, e))
                continue
            for bad, e in errors:
                aside = self.set_aside(bad)
                print(f"jaxarith train: {e}; moved it to {aside} and resumed from step {step}, "
                      "the newest complete checkpoint", file=sys.stderr, flush=True)
            return step, state, data_state, meta
        if not errors:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        raise CheckpointError(f"{errors[0][1]}" + ("; no older checkpoint restores either"
                                                   if len(errors) > 1 else
                                                   "; there is no older checkpoint"))

    def set_aside(self, step: int) -> str:
        """Rename the checkpoint of ``step`` to ``unreadable-STEP[-N]`` (kept for inspection,
        no longer a checkpoint: a new save of that step must not be skipped)."""
        src = os.path.join(self.directory, str(step))
        dst, n = os.path.join(self.directory, f"unreadable-{step}"), 1
        while os.path.lexists(dst):
            dst, n = os.path.join(self.directory, f"unreadable-{step}-{n}"), n + 1
        self._ckpt.close()
        os.rename(src, dst)
        self._ckpt = ocp.v1.training.Checkpointer(self.directory,
                                                  preservation_policy=self._policy)
        return dst

    def wait(self) -> None:
        self._ckpt.wait()

    def close(self) -> None:
        self._ckpt.close()


def _without_frozen(state: Any) -> Any:
    """The state with ``frozen`` emptied (what a checkpoint holds)."""
    if dataclasses.is_dataclass(state) and hasattr(state, "frozen"):
        return dataclasses.replace(state, frozen={})
    return state


def _cause(e: BaseException, limit: int = 300) -> str:
    """The innermost cause of ``e`` (orbax wraps a truncated file's tensorstore error in ones
    that name a handler registry, not the file)."""
    return innermost_cause(e, limit)


def _first_line(e: BaseException, limit: int = 300) -> str:
    """The head of an exception message (orbax's can be kilobytes of tree dumps)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."
