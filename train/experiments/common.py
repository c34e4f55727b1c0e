"""What every experiment pipeline shares: its output directory, atomic small files, training
stages through the training program, and the cached-stage runner with its progress lines."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

from jaxarith.errors import JaxarithError
from jaxarith.io.atomic import claim_dir
from train.loop import run

Log = Callable[[str], None]


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class StagePreempted(JaxarithError):
    """A training stage stopped on SIGTERM/Ctrl-C after saving a checkpoint: rerun to resume."""


def prepare_out(out: str, experiment: str) -> str:
    """Create ``out`` (or re-use one a jaxarith command made) and mark it as an experiment
    output (:func:`jaxarith.io.atomic.claim_dir`); a non-empty directory jaxarith did not write is
    refused."""
    return claim_dir(out, kind="experiment", info={"experiment": experiment})


def write_json(path: str, obj) -> None:
    """Write JSON atomically (a temporary sibling renamed into place)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def run_training(name: str, tcfg) -> dict:
    """Run one training stage through the training program (resuming from its checkpoint)."""
    summary = run(tcfg)
    if summary["status"] != "done":
        raise StagePreempted(f"stage {name} stopped at step {summary['step']} "
                             f"({summary['status']}); its checkpoint is in {tcfg.out}: rerun "
                             "the same command to resume")
    return {k: v for k, v in summary.items() if k not in ("state", "batches")}


class Stages:
    """Runs numbered stages, each skipped when its output exists, with one progress line at the
    start and end of each (``[i/n] name: what ...`` / ``done in s``) and the seconds per stage."""

    def __init__(self, total: int, log: Log):
        self.total, self.log, self.i = total, log, 0
        self.seconds: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def run(self, name: str, what: str, done: bool, fn: Callable[[], object],
            index: int | None = None) -> None:
        self.i = index if index is not None else self.i + 1
        tag = f"[{self.i}/{self.total}] {name}"
        if done:
            self.log(f"{tag}: cached ({what})")
            self.seconds[name] = 0.0
            return
        self.log(f"{tag}: {what} ...")
        t = time.perf_counter()
        fn()
        self.seconds[name] = round(time.perf_counter() - t, 1)
        self.log(f"{tag}: done in {self.seconds[name]:.1f} s "
                 f"(total {time.perf_counter() - self.t0:.0f} s)")

    def timings(self, results_path: str) -> dict:
        """Seconds per stage, keeping the earlier run's time of each cached stage (read from
        the previous ``results.json``), so a rerun does not report zeros."""
        prev: dict = {}
        if os.path.exists(results_path):
            try:
                with open(results_path) as f:
                    prev = json.load(f).get("seconds", {})
            except (OSError, json.JSONDecodeError):
                prev = {}
        return {k: v if v else prev.get(k, v) for k, v in self.seconds.items()}
