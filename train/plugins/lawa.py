"""LaWA with snapshots offloaded to the host: ``average: {kind: lawa, k: 5, every: 200,
offload: true}``.

For models where ``k`` device copies of the weights do not fit, the snapshots are not held in the
jitted step's state (the step then carries no averager) but copied to host memory after the
snapshot steps (:func:`jaxarith.average.averagers.snapshot_due`, the rule of the in-step
:class:`~jaxarith.average.averagers.LaWA`), each process keeping only the shards its devices hold.
Each snapshot is also written once, atomically, to ``OUT/lawa/<step>.p<process>.npz`` (only the
latest ``k`` are kept; ``OUT`` may be a URL, one object per snapshot), so a resumed run finds the
snapshots taken up to its checkpoint; files of later steps (written after the checkpoint it resumes
from) are discarded and taken again.

The average (mean of the snapshots, float32; the current weights before the first one) is put
back on the mesh for evaluation only, and reported as ``eval_avg/<source>/loss`` at the same
steps as ``eval/<source>/loss``. ``export.use_average`` needs the in-step LaWA.
"""

from __future__ import annotations

import io
import re

import jax
import numpy as np

from jaxarith.average.averagers import LaWAConfig, snapshot_due
from jaxarith.io import paths
from train.extensions import Extension, Hook, RunContext

SNAPSHOT_DIR = "lawa"
_FILE = re.compile(r"^(\d+)\.p(\d+)\.npz$")


def _key(index, shape) -> tuple:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _host_shards(x: jax.Array) -> dict[tuple, np.ndarray]:
    """The distinct shards this process holds, by their (start, stop) per axis, as float32."""
    out = {}
    for s in x.addressable_shards:
        k = _key(s.index, x.shape)
        if k not in out:
            out[k] = np.asarray(s.data, np.float32)
    return out


class HostSnapshots:
    """The host ring of LaWA snapshots of one run (created per run by :func:`extension`)."""

    def __init__(self, avg: LaWAConfig):
        self.avg = avg
        self.snaps: dict[int, list[dict[tuple, np.ndarray]]] = {}  # step -> per leaf shards
        self.directory: str | None = None

    def _path(self, step: int) -> str:
        return paths.join(self.directory, f"{step}.p{jax.process_index()}.npz")

    def _open(self, ctx: RunContext) -> None:
        """First call of the run: reload the snapshots taken up to the step it resumed from."""
        self.directory = paths.join(ctx.out, SNAPSHOT_DIR)
        paths.makedirs(self.directory)
        resumed = ctx.step - 1
        for name in paths.listdir(self.directory):
            m = _FILE.match(name)
            if not m or int(m.group(2)) != jax.process_index():
                continue
            step = int(m.group(1))
            if step > resumed:  # written after the checkpoint we resumed from
                paths.remove(paths.join(self.directory, name))
                continue
            with np.load(io.BytesIO(paths.read_bytes(paths.join(self.directory, name)))) as f:
                n = int(f["leaves"])
                leaves = []
                for i in range(n):
                    idx = f[f"i{i}"]
                    leaves.append({tuple(map(tuple, idx[j])): f[f"x{i}_{j}"]
                                   for j in range(idx.shape[0])})
            self.snaps[step] = leaves
        self._trim()

    def _trim(self) -> None:
        for step in sorted(self.snaps)[:-self.avg.k]:
            del self.snaps[step]
            paths.remove(self._path(step))

    def _write(self, step: int, leaves: list[dict]) -> None:
        arrays: dict = {"leaves": np.asarray(len(leaves))}
        for i, shards in enumerate(leaves):
            keys = list(shards)
            arrays[f"i{i}"] = np.asarray(keys, np.int64).reshape(len(keys), -1, 2)
            for j, k in enumerate(keys):
                arrays[f"x{i}_{j}"] = shards[k]
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        paths.write_bytes(self._path(step), buf.getvalue())  # appears whole

    def snapshot(self, ctx: RunContext) -> None:
        if self.directory is None:
            self._open(ctx)
        if not snapshot_due(ctx.step, self.avg.start, self.avg.every):
            return
        leaves = [_host_shards(x) for x in jax.tree.leaves(ctx.state.params)]
        self.snaps[ctx.step] = leaves
        self._write(ctx.step, leaves)
        self._trim()

    def value(self, params):
        """The mean of the held snapshots on the parameters' shardings (or ``params``)."""
        if not self.snaps:
            return params
        steps = sorted(self.snaps)
        flat, treedef = jax.tree.flatten(params)
        out = []
        for i, x in enumerate(flat):
            mean = {k: np.mean([self.snaps[s][i][k] for s in steps], axis=0, dtype=np.float64)
                    .astype(np.float32) for k in self.snaps[steps[0]][i]}
            out.append(jax.make_array_from_callback(
                x.shape, x.sharding, lambda idx, m=mean, shape=x.shape: m[_key(idx, shape)]))
        return jax.tree.unflatten(treedef, out)

    def evaluate(self, ctx: RunContext) -> dict | None:
        if ctx.final and not ctx.cfg.eval.at_end or not ctx.eval_sets:
            return None
        avg = self.value(ctx.state.params)
        ev = {f"eval_avg/{name}/loss": ctx.evaluate(avg, examples)
              for name, examples in ctx.eval_sets.items()}
        ctx.writer.log(f"eval (LaWA, {len(self.snaps)} host snapshots) @ {ctx.step}: "
                       + "  ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        if ctx.final:
            ctx.summary.setdefault("eval", {}).update(ev)
        return ev


def extension(cfg) -> Extension | None:
    """The offloaded-LaWA hooks when ``average`` is ``{kind: lawa, offload: true}``."""
    avg = cfg.average
    if not isinstance(avg, LaWAConfig) or not avg.offload:
        return None
    snaps = HostSnapshots(avg)
    return Extension(name="lawa", hooks=(
        Hook(name="lawa_snapshot", every=1, fn=snaps.snapshot, at_end=False),
        Hook(name="lawa_eval", every=cfg.eval.every, fn=snaps.evaluate, at_end=True)))
