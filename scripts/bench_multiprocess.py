"""Benchmark: conversion and export across processes: wall time and peak RSS per process.

The same work on 1 process x 8 CPU devices and on 2 processes x 4 devices (one machine, gloo
collectives), for a random bfloat16 Llama checkpoint (generated locally, as in
``bench_convert.py``), each run in fresh subprocesses (peak RSS of each measured by a small
launcher process, see ``PEAK_RSS``):

- ``hf->orbax``: ``jaxarith convert`` (each process reads only its devices' slices)
- ``orbax->hf``: ``jaxarith convert`` back (process 0 reads the host leaves and writes; the
  other processes read nothing)
- ``restore``: ``load_orbax`` onto every process's devices (``fsdp=-1``): each process reads
  only its devices' shards (the first half of ``export``, and what a training resume does)
- ``export``: the training export path: restore the Orbax checkpoint sharded over every
  process's devices (``fsdp=-1``), then ``save_hf`` from the in-memory global arrays: each
  tensor is gathered from all processes one at a time, process 0 writes

Target (issue 12): the export's peak RSS per process is bounded by a few of the largest tensors
above the process's fixed cost (``startup``: importing jax + jaxarith), like the single-process
route. On this 2-core machine the 2-process wall times measure the cores, not the method.

    python scripts/bench_multiprocess.py --quick     # one tiny size, about a minute
    python scripts/bench_multiprocess.py --size mid  # 0.34 GB, about 3 minutes
    python scripts/bench_multiprocess.py             # ~0.5B and ~1B
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import benchenv  # scripts/ is on sys.path when this file runs
from bench_convert import make_checkpoint

from jaxarith.testing import multiprocess as mt

SIZES = {"0.5B": (1536, 4096, 16, 12, 4, 32000), "1B": (2048, 8192, 16, 32, 8, 128256)}
QUICK = {"tiny": (512, 1024, 4, 8, 4, 16384)}
MID = {"mid": (1024, 2048, 4, 8, 4, 65536)}  # 0.34 GB, largest tensor 134 MB: about 3 min

RESTORE = """
import sys
import jax
from jaxarith import distributed, sharding
distributed.initialize(distributed.config_from_env())
from jaxarith.io.convert.orbax import load_orbax
cfg, params = load_orbax(sys.argv[1], mesh=sharding.make_mesh("fsdp=-1"))
jax.block_until_ready(params)
"""

EXPORT = """
import sys
from jaxarith import distributed, sharding
distributed.initialize(distributed.config_from_env())
from jaxarith.io.convert.export import save_hf
from jaxarith.io.convert.orbax import load_orbax
cfg, params = load_orbax(sys.argv[1], mesh=sharding.make_mesh("fsdp=-1"))
save_hf(cfg, params, sys.argv[2], progress=False)
"""


# Runs ``python ARGS`` in a child of a small Python process and writes the child's peak RSS
# (KiB) to a file. The peak RSS ``os.wait4`` reports for a direct child of this script is at
# least this script's own RSS when it forked (Linux keeps the high-water mark across exec), so
# measured directly every figure below ~0.7 GB (this process, with numpy and jax imported)
# read 0.70 GB.
PEAK_RSS = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def launch(args: list[str], processes: int) -> dict:
    """Run ``python ARGS`` as ``processes`` processes; wall s and per-process peak RSS (GB)."""
    port = mt.free_port()
    t0 = time.perf_counter()
    procs, logs, peaks = [], [], []
    for i in range(processes):
        cluster = {} if processes == 1 else {
            "JAXARITH_COORDINATOR": f"127.0.0.1:{port}", "JAXARITH_NUM_PROCESSES": str(processes),
            "JAXARITH_PROCESS_ID": str(i)}
        log = tempfile.TemporaryFile("w+")  # a file, not a pipe: nothing blocks on output
        logs.append(log)
        fd, peak = tempfile.mkstemp(prefix="bench_rss_")
        os.close(fd)
        peaks.append(peak)
        procs.append(subprocess.Popen([sys.executable, "-c", PEAK_RSS, peak, *args],
                                      stdout=log, stderr=log,
                                      env=mt.environment(8 // processes, cluster)))
    rss, cpu = [], []
    for p, log, peak in zip(procs, logs, peaks, strict=True):
        _, status, usage = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status):
            log.seek(0)
            raise RuntimeError(f"{args} failed: {log.read()[-2000:]}")
        with open(peak) as f:
            rss.append(int(f.read()) / 1e6)  # KiB on Linux
        os.remove(peak)
        cpu.append(usage.ru_utime + usage.ru_stime)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": sum(cpu), "rss_gb": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", choices=sorted({**QUICK, **MID, **SIZES}), default=None,
                    help="one size only (tiny, mid, 0.5B, 1B)")
    ap.add_argument("--out", default=None, help="JSON output (default bench_results/"
                    "multiprocess[_quick].json)")
    args = ap.parse_args()
    sizes = QUICK if args.quick else SIZES
    if args.size:
        sizes = {args.size: {**QUICK, **MID, **SIZES}[args.size]}
    args.out = args.out or f"bench_results/multiprocess{'_quick' if args.quick else ''}.json"
    work = tempfile.mkdtemp(prefix="bench_multiprocess_")
    machine = benchenv.start(quick=args.quick, torch_peak=False)
    startup = launch(["-c", "import jaxarith.io.convert.route, jax; jax.devices()"], 1)
    rows = []
    try:
        for name, dims in sizes.items():
            src = os.path.join(work, f"hf-{name}")
            total, largest = make_checkpoint(src, dims)
            for n in (1, 2):  # interleaved per size: both sides see the same machine load
                orbax, back, exp = (os.path.join(work, f"{x}-{name}-{n}")
                                    for x in ("orbax", "back", "export"))
                h2o = launch(["-m", "jaxarith", "convert", src, orbax, "--mesh", "fsdp=-1",
                              "--json"], n)
                o2h = launch(["-m", "jaxarith", "convert", orbax, back, "--json"], n)
                restore = launch(["-c", RESTORE, orbax], n)
                export = launch(["-c", EXPORT, orbax, exp], n)
                rows.append({"model": name, "gb": total / 1e9, "largest_tensor_gb": largest / 1e9,
                             "processes": n, "hf_to_orbax": h2o, "orbax_to_hf": o2h,
                             "restore": restore, "export": export})
                for d in (orbax, back, exp):
                    shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine = benchenv.finish(machine)
    print(benchenv.describe(machine))
    base = startup["rss_gb"][0]
    print(f"startup (import + devices): "
          f"{startup['wall_s']:.1f} s, {base:.2f} GB RSS")
    print(f"{'model':>6} {'GB':>5} {'largest':>7} {'P':>2} {'HF->Orbax s':>11} {'RSS/proc':>12} "
          f"{'Orbax->HF s':>11} {'RSS/proc':>12} {'restore s':>9} {'RSS/proc':>12} "
          f"{'export s':>9} {'RSS/proc':>12} {'export-startup / largest':>24}")
    for r in rows:
        fmt = lambda m: "/".join(f"{x:.2f}" for x in m["rss_gb"])
        above = max(r["export"]["rss_gb"]) - base
        r["export_rss_above_startup_in_largest_tensors"] = above / r["largest_tensor_gb"]
        print(f"{r['model']:>6} {r['gb']:5.2f} {r['largest_tensor_gb']:7.3f} {r['processes']:>2} "
              f"{r['hf_to_orbax']['wall_s']:11.1f} {fmt(r['hf_to_orbax']):>12} "
              f"{r['orbax_to_hf']['wall_s']:11.1f} {fmt(r['orbax_to_hf']):>12} "
              f"{r['restore']['wall_s']:9.1f} {fmt(r['restore']):>12} "
              f"{r['export']['wall_s']:9.1f} {fmt(r['export']):>12} "
              f"{r['export_rss_above_startup_in_largest_tensors']:24.1f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"quick": args.quick, "machine": machine, "startup": startup,
                   "rows": rows}, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
