"""Run an iterator ahead of its consumer on a worker thread (overlap read, compute and write).

File reads, numpy copies (of native dtypes), XLA and file writes release the GIL, so while the
consumer writes one tensor the worker can build the next: on two cores a streamed conversion
then takes about the longer of the two instead of their sum. Memory: ``depth`` more items.

:func:`recycle_memory` makes freed tensor buffers reusable within the process (see there).
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import functools
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


def ahead(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Yield the items of ``items`` in order, producing up to ``depth`` of them in advance on one
    worker thread (so the producer's steps still run one at a time, in order).

    Args:
      items: any iterable; its errors are raised in the consumer, at the item that failed.
      depth: how many items may be produced ahead (0: plain iteration).
    """
    it = iter(items)
    if depth <= 0:
        yield from it
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = collections.deque(pool.submit(next, it, _END) for _ in range(depth))
        try:
            while True:
                x = pending.popleft().result()
                if x is _END:
                    return
                pending.append(pool.submit(next, it, _END))
                yield x
                del x
        finally:
            for f in pending:
                f.cancel()
            concurrent.futures.wait(pending)
            if hasattr(it, "close"):
                it.close()


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


@functools.cache
def recycle_memory() -> bool:
    """Let glibc reuse freed large buffers instead of returning them to the kernel (idempotent).

    A streamed conversion or merge allocates and frees a few tensor-sized buffers per tensor.
    By default glibc serves each large allocation with a fresh ``mmap`` and unmaps it on free, so
    every tensor pays page faults and the kernel's zeroing of all its pages again: measured on
    this VM at about a third of a streamed Orbax -> HF conversion's time (sys time 2.9 -> 1.3 s
    at 0.5B, 5.2 -> 3.5 s wall). Serving them from one arena that keeps freed memory instead
    makes the next tensor reuse the same, already mapped pages; peak memory stays that of the
    largest tensors in flight (measured slightly lower: fewer partially used mappings).

    Process-wide, so only the CLI commands call it (``jaxarith convert --to hf``, ``merge``,
    ``delta``: each its own process), never the library functions; a Python caller may call it
    before a streamed job. A no-op returning False where malloc is not glibc's.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_ARENA_MAX, 1)  # thread arenas would mmap large blocks regardless
    ok &= mallopt(_M_MMAP_THRESHOLD, 1 << 30)  # tensors up to 1 GiB from the heap
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(ok)
