"""The machine a benchmark ran on, measured in the same run: shared by every ``scripts/bench_*.py``.

A ratio against a peer is only meaningful with the conditions it was taken under, and the CPU
differs between machines (an AVX-512/AMX Xeon here, an AMD EPYC there), so every benchmark
records, next to its rows:

- the CPU model, its core count, the instruction-set flags that decide the matmul kernels
  (``avx2``, ``avx512f``, ``avx512_bf16``, ``amx_tile``, ``amx_bf16``) and its cache sizes;
- this run's float32 matmul peak in jax (and in torch when installed), timed here and not taken
  from a table, so MFU columns are fractions of what this CPU reached in this run;
- this run's copy bandwidth (a 256 MiB numpy copy), the reference for streamed merges and
  conversion;
- the load average at the start and the end: a table measured with other work running (a load
  above half the cores at the start, or above the cores + 1 at the end, when the benchmark's own
  threads count) says so (``busy``), because a shared machine makes every wall time too slow.

Use::

    import benchenv                      # scripts/ is on sys.path when a script runs
    env = benchenv.start()               # machine facts, peaks, load at start
    ...                                  # the benchmark
    env = benchenv.finish(env)           # load at end, ``busy`` flag
    print(benchenv.describe(env))        # one line for the table's header
    json.dump({"machine": env, "rows": rows}, f)
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import platform
import re
import time

import numpy as np

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "fma")


def cpu_info() -> dict:
    """Model name, logical cores, selected flags and cache sizes (``/proc/cpuinfo``, sysfs)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    caches = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(f"{base}/{entry}/level") as f:
                level = f.read().strip()
            with open(f"{base}/{entry}/type") as f:
                kind = f.read().strip()
            with open(f"{base}/{entry}/size") as f:
                size = f.read().strip()
        except OSError:
            continue
        name = f"L{level}" + ({"Data": "d", "Instruction": "i"}.get(kind, ""))
        caches[name] = size
    return {"cpu_model": model, "cores": os.cpu_count(),
            "flags": [f for f in FLAGS if f in flags], "caches": caches}


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def jax_matmul_peak(n: int = 2048, reps: int = 8) -> float:
    """FLOP/s of a jitted float32 ``[n, n] @ [n, n]`` on the first jax device (best of ``reps``)."""
    import jax

    a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2.0 * n**3 / _best(lambda: f(a).block_until_ready(), reps)


def torch_matmul_peak(n: int = 2048, reps: int = 8) -> float | None:
    """FLOP/s of a float32 torch matmul, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    a = torch.randn(n, n, dtype=torch.float32)
    torch.mm(a, a)
    return 2.0 * n**3 / _best(lambda: torch.mm(a, a), reps)


def copy_bandwidth(mib: int = 256, reps: int = 5) -> float:
    """Bytes/s of a numpy copy of ``mib`` MiB (read + write counted once, as a file copy is)."""
    src = np.ones(mib * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    return src.nbytes / _best(lambda: np.copyto(dst, src), reps)


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def start(quick: bool = False, torch_peak: bool = True) -> dict:
    """Machine facts and this run's measured peaks; call before the benchmark."""
    n = 1024 if quick else 2048
    env = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "load_average_start": round(load_average(), 2), **cpu_info(),
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    try:
        import jax

        env["jax"] = jax.__version__
        env["jax_devices"] = len(jax.devices())
        env["jax_matmul_peak_gflops"] = round(jax_matmul_peak(n) / 1e9, 1)
    except ImportError:
        pass
    if torch_peak:
        peak = torch_matmul_peak(n)
        if peak is not None:
            import torch

            env["torch"] = torch.__version__
            env["torch_threads"] = torch.get_num_threads()
            env["torch_matmul_peak_gflops"] = round(peak / 1e9, 1)
    env["copy_gb_s"] = round(copy_bandwidth(64 if quick else 256) / 1e9, 2)
    return env


def finish(env: dict) -> dict:
    """Add the load average at the end and whether the machine was busy during the run."""
    end = round(load_average(), 2)
    cores = env.get("cores") or 1
    # busy: other work at the start, or more at the end than this benchmark's own threads
    busy = env.get("load_average_start", 0.0) > max(1.0, 0.5 * cores) or end > cores + 1
    return {**env, "load_average_end": end, "busy": busy}


def describe(env: dict) -> str:
    """One header line: CPU, flags, peaks, bandwidth, load (and a warning when busy)."""
    parts = [f"{env.get('cpu_model', '?')} ({env.get('cores')} cores; "
             f"{' '.join(env.get('flags', [])) or 'no listed flags'})"]
    if "jax_matmul_peak_gflops" in env:
        parts.append(f"f32 matmul peak jax {env['jax_matmul_peak_gflops']} GFLOP/s")
    if "torch_matmul_peak_gflops" in env:
        parts.append(f"torch {env['torch_matmul_peak_gflops']} GFLOP/s")
    parts.append(f"copy {env.get('copy_gb_s')} GB/s")
    load = f"load {env.get('load_average_start')}"
    if "load_average_end" in env:
        load += f" -> {env['load_average_end']}"
    parts.append(load)
    line = "; ".join(parts)
    if env.get("busy"):
        line += ("\nWARNING: the machine was busy (other work beside this benchmark): "
                 "wall times are too slow")
    return line


def profile_ops(compiled, call_args, trace_dir: str, top: int = 25) -> list[str]:
    """Trace one call of ``compiled`` and return lines: total ms, count, op, shape, fused ops.

    Times are the XLA CPU thunks' wall times summed over the call (ops inside the layer scan
    count once per layer); they include waiting for the cores when other processes run.
    """
    import jax

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        jax.block_until_ready(compiled(*call_args))
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"),
                             recursive=True), key=os.path.getmtime)
    if not files:
        return [f"no perfetto trace written under {trace_dir}"]
    with gzip.open(files[-1]) as fh:
        events = json.load(fh)
    events = events["traceEvents"] if isinstance(events, dict) else events
    hlo = compiled.as_text()
    # instruction name -> (result shape, called computation)
    insts = {m[1]: (m[2], m[3]) for m in re.finditer(
        r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+\[[\d,]*\])\S* \w[\w-]*\(.*?calls=%?([\w.\-]+)",
        hlo, re.M)}
    bodies = {m[1]: m[2] for m in re.finditer(r"^%?([\w.\-]+) \(.*?\{\n(.*?)\n\}", hlo,
                                              re.M | re.S)}
    total, count = collections.defaultdict(float), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in insts:
            total[e["name"]] += e.get("dur", 0) / 1e3
            count[e["name"]] += 1
    boring = {"parameter", "bitcast", "broadcast", "constant"}
    lines = [f"{'ms':>9} {'n':>3}  {'op':32} {'result':22} fused ops "
             f"(sum of listed ops {sum(total.values()):.0f} ms)"]
    for op, ms in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        shape, calls = insts[op]
        inner = sorted(set(re.findall(r"\} (\w[\w-]*)\(", bodies.get(calls, ""))) - boring)
        lines.append(f"{ms:9.1f} {count[op]:3d}  {op:32} {shape:22} {','.join(inner)}")
    return lines
