"""The ``jaxarith`` command: thin parsers that call the library.

Each subcommand lives in its own module under ``jaxarith/commands/`` with a ``register(sub)``
function; modules are discovered, so adding a command touches no shared file. Every subcommand
takes ``--json`` and then prints exactly one JSON object on stdout (errors included:
``{"error": ...}``), human output otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from jaxarith import __version__, distributed
from jaxarith.commands import _common


def build_parser() -> argparse.ArgumentParser:
    import jaxarith.commands as pkg

    parser = argparse.ArgumentParser(
        prog="jaxarith",
        description="Weight and logit arithmetic for pre-trained language models (JAX/Flax NNX).",
    )
    parser.add_argument("--version", action="version", version=f"jaxarith {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"jaxarith.commands.{info.name}").register(sub)
    for command in sub.choices.values():  # every subcommand can run on many processes
        _add_shared(command)
    return parser


def _add_shared(p: argparse.ArgumentParser) -> None:
    """The flags of every leaf parser (``delta extract``, not ``delta``): multi-process runs,
    ``--allow-nonfinite``."""
    nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    for action in nested:
        for child in action.choices.values():
            _add_shared(child)
    if not nested and "--coordinator" not in p._option_string_actions:
        distributed.add_arguments(p)
    if not nested and "--allow-nonfinite" not in p._option_string_actions:
        _common.add_allow_nonfinite(p)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C while the commands (and jax) are imported
        print("jaxarith: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return _common.run(args)


if __name__ == "__main__":
    sys.exit(main())
