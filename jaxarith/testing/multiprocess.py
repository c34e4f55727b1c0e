"""Start one command as N local JAX processes (for tests and benchmarks on one machine).

Every process gets ``--coordinator 127.0.0.1:PORT --num-processes N --process-id I`` (through
the ``JAXARITH_*`` environment, so any ``jaxarith`` subcommand or ``python -m train`` works
unchanged), its own ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (an inherited
8-device flag would otherwise leak in) and one shared timeout, so a hung collective fails the
test instead of hanging it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence


def free_port() -> int:
    """A TCP port that was free a moment ago (for the coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Result:
    """One process's exit code, stdout and stderr (``timed_out``: killed at the timeout)."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False


def environment(devices: int, extra: dict | None = None) -> dict:
    """The environment of a child process: this one's, with ``devices`` CPU devices."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXARITH_")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start(args: Sequence[str], *, processes: int, devices: int, port: int | None = None,
          cwd: str | None = None, env: dict | None = None) -> list[subprocess.Popen]:
    """Start ``python ARGS...`` as ``processes`` processes of one run (returns the Popens)."""
    port = port or free_port()
    procs = []
    for i in range(processes):
        cluster = {} if processes == 1 else {
            "JAXARITH_COORDINATOR": f"127.0.0.1:{port}",
            "JAXARITH_NUM_PROCESSES": str(processes), "JAXARITH_PROCESS_ID": str(i),
            "JAXARITH_INIT_TIMEOUT": "180", "JAXARITH_HEARTBEAT_TIMEOUT": "30"}
        procs.append(subprocess.Popen(
            [sys.executable, *args], cwd=cwd, env=environment(devices, {**cluster, **(env or {})}),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float) -> list[Result]:
    """Wait for every process (one shared deadline); kill all of them at the deadline."""
    deadline = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append(Result(p.returncode, out, err))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            out, err = p.communicate()
            results.append(Result(p.returncode, out, err, timed_out=True))
    return results


def run(args: Sequence[str], *, processes: int, devices: int, timeout: float = 300,
        cwd: str | None = None, env: dict | None = None) -> list[Result]:
    """Start and wait (see :func:`start`, :func:`wait`)."""
    return wait(start(args, processes=processes, devices=devices, cwd=cwd, env=env), timeout)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jaxarith.testing.multiprocess [--processes N] [--devices D] [--timeout S] --
    PYTHON_ARGS...``: run ``python PYTHON_ARGS`` as N local processes of one multi-process run
    (e.g. ``-- -m jaxarith convert SRC DST --mesh data=2,fsdp=4 --json``). Process 0's stdout
    is printed; every process's stderr follows, prefixed by its index. Exits with the first
    non-zero exit code (124 at the timeout)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m jaxarith.testing.multiprocess",
                                description=main.__doc__)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices", type=int, default=4, help="CPU devices per process")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if not args:
        p.error("give the python arguments after --, e.g. -- -m jaxarith convert SRC DST")
    results = run(args, processes=a.processes, devices=a.devices, timeout=a.timeout)
    sys.stdout.write(results[0].stdout)
    for i, r in enumerate(results):
        for line in r.stderr.splitlines():
            print(f"[{i}] {line}", file=sys.stderr)
    for r in results:
        if r.timed_out:
            return 124
        if r.returncode:
            return r.returncode if r.returncode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
