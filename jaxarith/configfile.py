"""The one reader of the YAML (and JSON) files a user gives: merge, train, experiment, MoE configs.

Bounded, so that a small hostile file cannot make a command spend minutes or gigabytes:

- the file may be at most :data:`MAX_BYTES` long;
- YAML aliases are allowed (``&defaults`` / ``*defaults``), but the document they expand to may
  hold at most :data:`MAX_VALUES` values (a 700-byte file of nested aliases can otherwise stand
  for 10^8 values: the "billion laughs"); a recursive alias is refused;
- nesting deeper than PyYAML can follow is refused;
- error messages quote at most a few hundred characters of any value (:func:`short`).

PyYAML builds an aliased node once and shares it, so loading such a file is cheap: it is the
expansion (copying, checking, printing it) that explodes. :func:`expanded_size` counts it without
expanding.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from jaxarith.errors import ConfigError

MAX_BYTES = 16 * 2**20
MAX_VALUES = 1_000_000


def short(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters (a config value may be huge)."""
    if isinstance(value, dict | list | tuple):
        try:
            big = expanded_size(value, limit) > limit
        except ConfigError:
            return f"<a recursive {type(value).__name__}>"
        if big:  # repr would expand every alias
            return f"<a {type(value).__name__} of more than {limit} values>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f" ... ({len(text)} characters)"


def expanded_size(obj: Any, cap: int = MAX_VALUES) -> int:
    """How many values ``obj`` holds with every shared (aliased) part counted each time it
    appears, counting no further than just past ``cap``.

    Raises:
      ConfigError: ``obj`` contains itself (a recursive YAML alias).
    """
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(o) -> int:
        if not isinstance(o, dict | list | tuple):
            return 1
        key = id(o)
        if key in memo:
            return memo[key]
        if key in active:
            raise ConfigError("a recursive YAML alias (a value that contains itself)")
        active.add(key)
        total = 1
        for child in (o.items() if isinstance(o, dict) else o):
            total += size(child[1]) + 1 if isinstance(o, dict) else size(child)
            if total > cap:
                break
        active.discard(key)
        memo[key] = total = min(total, cap + 1)
        return total

    try:
        return size(obj)
    except RecursionError:
        raise ConfigError("nested too deeply") from None


def parse_yaml(text: str, where: str) -> Any:
    """The YAML (or JSON) document ``text``, bounded as the module doc says.

    Args:
      where: what to name in errors (the file, the command-line override).
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        msg = str(e)
        raise ConfigError(f"{where}: invalid YAML ({msg[:300]}"
                          f"{' ...' if len(msg) > 300 else ''})") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    try:
        n = expanded_size(data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if n > MAX_VALUES:
        raise ConfigError(f"{where}: expands to more than {MAX_VALUES} values (nested YAML "
                          "aliases?); refused")
    return data


def load_json(path: str | os.PathLike, what: str = "JSON") -> Any:
    """Read a JSON file (a model's ``config.json``, a safetensors index) of at most
    :data:`MAX_BYTES` bytes (JSON has no aliases: the file size bounds it).

    Raises:
      FileNotFoundError: as ``open`` (callers name what is missing).
      ConfigError: too large, or not valid JSON (quoted short).
    """
    import json

    path = os.fspath(path)
    size = os.path.getsize(path)
    if size > MAX_BYTES:
        raise ConfigError(f"{path}: {size} bytes; a {what} file may be at most {MAX_BYTES} bytes")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {str(e)[:300]}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None


def load_yaml(path: str | os.PathLike, what: str = "config") -> Any:
    """Read and parse the YAML (or JSON) file ``path``, bounded as the module doc says.

    Args:
      what: what the file is, for a missing file ("no such merge config: PATH").
    Raises:
      ConfigError: missing, too large, not UTF-8, not YAML, or expanding past the cap.
    """
    path = os.fspath(path)
    try:
        if os.path.isdir(path):
            raise ConfigError(f"{path}: is a directory, not a {what} file")
        size = os.path.getsize(path)
        if size > MAX_BYTES:
            raise ConfigError(f"{path}: {size} bytes; a {what} file may be at most "
                              f"{MAX_BYTES} bytes")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"no such {what} file: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse_yaml(text, path)
