"""Several JAX processes, one lm-eval run: process 0 drives lm-eval, the others follow.

lm-eval is a single-process program (its own data parallelism is torch's), but a model sharded
over the devices of several JAX processes runs every jitted program collectively: each process
must call it, in the same order, with the same inputs. As in Levanter, process 0 alone runs
lm-eval; every collective operation of :class:`jaxarith.eval.lmeval.JaxarithLM` (a scoring call,
a generation batch) is first *sent* to the other processes (:func:`send`: its name and pickled
host arguments, broadcast from process 0), which wait in :meth:`JaxarithLM.follow` and make the
identical call; a final ``stop`` message (also after an error on process 0) ends them.

Messages travel with ``jax.experimental.multihost_utils.broadcast_one_to_all``: a fixed-size
header (the payload's length and, when it fits, the payload itself), then, for a longer payload,
its bytes padded to a power of two (so a bounded number of broadcast programs compile). A
follower may wait a long time in the header's broadcast (while process 0 loads tasks); gloo
waits for it (measured: 150 s and 700 s waits on this CPU).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from typing import Any

import numpy as np

from jaxarith.errors import ConfigError, JaxarithError

log = logging.getLogger(__name__)

HEADER = 4096  # bytes of the first broadcast: 8 for the length, the rest for a short payload
STOP = "stop"


def _broadcast(buf: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(buf))


def send(message: Any) -> None:
    """Process 0: broadcast ``message`` (any picklable object) to the other processes, which
    receive it with :func:`receive`. A collective: every process must take part."""
    raw = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    head = np.zeros(HEADER, np.uint8)
    head[:8] = np.frombuffer(np.int64(len(raw)).tobytes(), np.uint8)
    if len(raw) <= HEADER - 8:
        head[8:8 + len(raw)] = np.frombuffer(raw, np.uint8)
        _broadcast(head)
        return
    _broadcast(head)
    body = np.zeros(_padded(len(raw)), np.uint8)
    body[:len(raw)] = np.frombuffer(raw, np.uint8)
    _broadcast(body)


def receive() -> Any:
    """Processes other than 0: the next object process 0 sends (blocks until it does)."""
    head = _broadcast(np.zeros(HEADER, np.uint8))
    n = int(np.frombuffer(head[:8].tobytes(), np.int64)[0])
    if n <= HEADER - 8:
        return pickle.loads(head[8:8 + n].tobytes())
    body = _broadcast(np.zeros(_padded(n), np.uint8))
    return pickle.loads(body[:n].tobytes())


def _padded(n: int) -> int:
    """The smallest power of two >= ``n`` (bounded number of payload shapes)."""
    return 1 << max(0, n - 1).bit_length()


def share(value: Any, *, primary: bool) -> Any:
    """Process 0's ``value`` on every process (``primary``: this is process 0)."""
    if primary:
        send(value)
        return value
    return receive()


class Collective:
    """The leader / follower protocol of :class:`~jaxarith.eval.lmeval.JaxarithLM` (a mixin).

    The class using it sets ``_OPS`` (operation name -> method name), ``_processes`` (the JAX
    process count), ``_primary`` (this is process 0) and ``_stopped`` (False).
    """

    _OPS: dict[str, str] = {}
    _processes: int = 1
    _primary: bool = True
    _stopped: bool = False

    def _collective(self, op: str, kwargs: dict, **local):
        """Run the operation ``op`` (a name in ``_OPS``) with host ``kwargs``. In a
        multi-process run, process 0 first sends it to the processes in :meth:`follow`, so
        all of them run the same jitted programs; ``local`` arguments (callbacks) stay here."""
        if self._processes > 1:
            if not self._primary:
                raise ConfigError("model=jaxarith: in a multi-process run only process 0 runs "
                                  "lm-eval; the other processes call JaxarithLM.follow()")
            if self._stopped:
                raise ConfigError("model=jaxarith: the other processes were already stopped "
                                  "(stop_followers); no more requests can run")
            send((op, kwargs))
        return getattr(self, self._OPS[op])(**kwargs, **local)

    def follow(self) -> None:
        """Processes other than 0 of a multi-process run: make every collective call process 0
        makes, until it calls :meth:`stop_followers` (:meth:`leading` does).

        An input error process 0 also meets (a :class:`~jaxarith.errors.JaxarithError`, raised
        before any collective) does not end the loop: process 0 decides what follows.

        Raises:
          JaxarithError: process 0 stopped after an error (its message), so the run fails on
            every process.
          ConfigError: called in process 0, or in a single-process run.
        """
        if self._processes == 1 or self._primary:
            raise ConfigError("JaxarithLM.follow() is for processes other than 0 of a "
                              "multi-process run; process 0 runs lm-eval")
        while True:
            op, kwargs = receive()
            if op == STOP:
                if kwargs.get("error"):
                    raise JaxarithError(f"process 0 failed: {kwargs['error']}")
                return
            try:
                getattr(self, self._OPS[op])(**kwargs)
            except JaxarithError as e:  # the same input error as process 0's
                log.debug("follower: %s failed like on process 0: %s", op, e)

    def stop_followers(self, error: str | None = None) -> None:
        """Process 0: end the other processes' :meth:`follow` (``error``: process 0 failed
        with this message; they raise it). Does nothing with one process or when done."""
        if self._processes == 1 or not self._primary or self._stopped:
            return
        self._stopped = True
        send((STOP, {"error": error}))

    @contextlib.contextmanager
    def leading(self):
        """Process 0: run lm-eval inside ``with lm.leading():``; the followers are stopped on
        the way out, with the error when one leaves the block (so they never wait forever)."""
        try:
            yield self
        except BaseException as e:
            self.stop_followers(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            raise
        finally:
            self.stop_followers()

