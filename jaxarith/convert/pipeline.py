"""Run an iterator ahead of its consumer on a worker thread (overlap read, compute and write).

File reads, numpy copies (of native dtypes), XLA and file writes release the GIL, so while the
consumer writes one tensor the worker can build the next: on two cores a streamed conversion
then takes about the longer of the two instead of their sum. Memory: ``depth`` more items.
"""

from __future__ import annotations

import collections
import concurrent.futures
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
