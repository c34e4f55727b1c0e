"""``model_args`` values as lm-eval passes them (strings from a command line, or typed values
from Python), checked with errors that name the key."""

from __future__ import annotations

from jaxarith.errors import ConfigError


def boolean(name: str, v) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "1", "yes"):
        return True
    if str(v).lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"model_args {name}={v!r}: expected true or false")


def number(name: str, v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"model_args {name}={v!r}: expected a number") from None


def positive(name: str, v, default: int | None) -> int | None:
    if v is None:
        return default
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"model_args {name}={v!r}: expected a positive integer") from None
    if n < 1:
        raise ConfigError(f"model_args {name}={v!r}: must be at least 1")
    return n
