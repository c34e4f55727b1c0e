"""What every subcommand shares: common flags, JSON/human output, and error reporting."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from jaxarith.errors import JaxarithError


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout instead of human output")


def add_mesh(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--mesh", default=default, metavar="SPEC",
                   help="device mesh, e.g. 'fsdp=-1' or 'data=2,fsdp=2,tensor=2' "
                        "(default: one device)")
    p.add_argument("--strict-sharding", action="store_true",
                   help="a parameter dimension that does not divide its mesh axes is an error "
                        "(default: replicated along it, with a warning)")


def add_dtype(p: argparse.ArgumentParser, default: str = "float32",
              choices=("float32", "bfloat16")) -> None:
    p.add_argument("--dtype", default=default, choices=choices, help=f"default {default}")


def mesh_from(args) -> Any:
    """The mesh of ``--mesh`` (None without one); ``--strict-sharding`` makes every parameter
    sharding of this command strict."""
    if not getattr(args, "mesh", None):
        return None
    from jaxarith.sharding import make_mesh, set_strict_sharding

    set_strict_sharding(getattr(args, "strict_sharding", False))
    return make_mesh(args.mesh)


def progress_enabled(args) -> bool:
    """Progress bars go to stderr, only for humans at a terminal."""
    return not getattr(args, "json", False) and sys.stderr.isatty()


def emit(args, result: dict[str, Any], human: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result))
    else:
        print(human)


def run(args) -> int:
    """Call the subcommand's handler; a JaxarithError becomes a one-line error, exit code 2."""
    try:
        return int(args.handler(args) or 0)
    except (JaxarithError, FileNotFoundError, FileExistsError, PermissionError) as e:
        msg = str(e) if not isinstance(e, OSError) or not e.filename else \
            f"{e.strerror}: {os.fspath(e.filename)}"
        if getattr(args, "json", False):
            print(json.dumps({"error": msg, "type": type(e).__name__}))
        else:
            print(f"jaxarith {args.command}: error: {msg}", file=sys.stderr)
        return 2
