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
