"""Errors that jaxarith raises on bad input.

Every error names the thing at fault (the tensor, the layer, the config key, the mesh axis), so a
user can fix the input without reading a traceback.
"""

from __future__ import annotations


class JaxarithError(Exception):
    """Base class of every error jaxarith raises on bad input."""


class ConfigError(JaxarithError, ValueError):
    """A model, mesh or run configuration is invalid (names the key at fault)."""


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint's ``model_type`` is not one jaxarith implements."""


class CheckpointError(JaxarithError):
    """A checkpoint is missing tensors, has unexpected ones, wrong shapes or corrupt files."""


class MissingTensorError(CheckpointError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnexpectedTensorError(CheckpointError):
    pass


class ShapeMismatchError(CheckpointError, ValueError):
    pass


class ShardingError(ConfigError):
    """A parameter dimension does not divide the mesh axis it is sharded over (strict mode)."""


class ArchitectureMismatchError(CheckpointError, ValueError):
    """Models combined by delta arithmetic or merging differ in tensor names or shapes."""


def innermost_cause(e: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of the innermost cause of ``e``, at most ``limit`` characters.

    Storage libraries (orbax, tensorstore) wrap the error that names the damaged file in ones
    that name a handler registry or dump a tree; the innermost one says what is wrong.
    """
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= limit else line[:limit] + " ..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


class Terminated(BaseException):
    """SIGTERM arrived (raised like KeyboardInterrupt, so clean-up code runs).

    A ``BaseException`` so that ``except Exception`` blocks do not swallow it.
    """

    def __init__(self, signum: int = 15):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        import signal

        return f"terminated by {signal.Signals(self.signum).name}"
