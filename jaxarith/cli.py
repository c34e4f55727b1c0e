"""The ``jaxarith`` command: thin parsers that call the library.

Each subcommand lives in its own module with a ``register(sub)`` function: the library's commands
under ``jaxarith/commands/`` (discovered), and commands of other packages through the entry-point
group ``jaxarith.commands`` (the training program's ``train``, ``inheritune``, ``distill``,
``average`` and ``experiment`` live in ``train/commands/``, since the library never imports
``train``). Adding a command touches no shared file. Every subcommand
takes ``--json`` and then prints exactly one JSON object on stdout (errors included:
``{"error": ...}``), human output otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import pkgutil
import sys

import jaxarith.commands as pkg
from jaxarith import __version__, distributed
from jaxarith.commands import _common

ENTRY_POINTS = "jaxarith.commands"


def command_modules() -> list:
    """The modules that define subcommands: ``jaxarith.commands.*`` and the entry points."""
    mods = [importlib.import_module(f"jaxarith.commands.{m.name}")
            for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name)
            if not m.name.startswith("_")]
    eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINTS), key=lambda e: e.name)
    mods += [ep.load() for ep in eps]
    return sorted(mods, key=lambda m: m.__name__.rpartition(".")[2])  # --help lists by name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxarith",
        description="Weight and logit arithmetic for pre-trained language models (JAX/Flax NNX).",
    )
    parser.add_argument("--version", action="version", version=f"jaxarith {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in command_modules():
        module.register(sub)
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


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None):
    """``parse_args``, except that ``KEY=VALUE`` overrides may also follow the options (``plan
    CONFIG --topology v5p-8 batch=64``), for the subcommands that take ``overrides``."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_with_overrides(build_parser(), argv)
    except KeyboardInterrupt:  # Ctrl-C while the commands (and jax) are imported
        print("jaxarith: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return _common.run(args)


# exit codes of a command ended by Ctrl-C (130) or SIGTERM (143)
_SIGNALLED = (130, 143)


def entry() -> None:
    """The ``jaxarith`` program: :func:`main`, then exit with its code.

    A command ended by Ctrl-C or SIGTERM has already removed its unfinished outputs; it then ends
    with ``os._exit`` and skips the interpreter's teardown. Worker threads that were computing a
    tensor when the signal came (:mod:`jaxarith.arith.stream` does not wait for them) would
    otherwise be unwound inside XLA while the interpreter finalizes, which aborts the process
    (exit -6 instead of 130/143).
    """
    code = main()
    if code in _SIGNALLED:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
