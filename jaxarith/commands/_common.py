"""What every subcommand shares: common flags, JSON/human output, and error reporting."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from jaxarith import distributed
from jaxarith.distributed import is_primary
from jaxarith.errors import ConfigError, JaxarithError, Terminated
from jaxarith.io.atomic import terminate_as_exception
from jaxarith.io.finite import set_allow_nonfinite
from jaxarith.sharding import make_mesh, set_strict_sharding


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout instead of human output")


def add_model_output(p: argparse.ArgumentParser) -> None:
    """``--to hf|orbax`` and ``--overwrite`` of a command that writes one model to OUT."""
    p.add_argument("--to", choices=("hf", "orbax"), default="hf", help="output format")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")


def add_allow_nonfinite(p: argparse.ArgumentParser) -> None:
    """``--allow-nonfinite`` (every command): read checkpoints holding NaN/Inf weights, and
    write outputs that do, instead of refusing them (:mod:`jaxarith.io.finite`)."""
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="accept NaN/Inf weights in inputs and outputs (default: refused, "
                        "naming the tensor)")


def add_combination(p: argparse.ArgumentParser) -> None:
    """The logit-arithmetic flags shared by ``generate`` and ``lm-eval``: proxy tuning
    (``--expert/--anti-expert/--alpha``) or emulated fine-tuning (``--eft TUNED REF --beta``)."""
    p.add_argument("--expert", help="proxy tuning: the small tuned model")
    p.add_argument("--anti-expert", help="proxy tuning: the small untuned model")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--eft", nargs=2, metavar=("TUNED", "REF"),
                   help="emulated fine-tuning with this tuned model and its base")
    p.add_argument("--beta", type=float, default=1.0)


def combination_refs(args, mode: str) -> list[str]:
    """The model references of ``add_combination``'s flags, in member order (``mode`` as
    :func:`jaxarith.commands.generate.check_mode` names it)."""
    if mode == "proxy":
        return [args.model, args.expert, args.anti_expert]
    if mode == "eft":
        return [args.model, *args.eft]
    return [args.model]


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
    """The mesh of ``--mesh`` (None without one: one device); ``--strict-sharding`` makes every
    parameter sharding of this command strict. In a multi-process run the default is
    ``fsdp=-1`` over every process's devices (one device would leave the others idle)."""
    if not getattr(args, "mesh", None):
        if distributed.process_count() == 1 or not hasattr(args, "mesh"):
            return None
        args.mesh = "fsdp=-1"

    set_strict_sharding(getattr(args, "strict_sharding", False))
    return make_mesh(args.mesh)


def progress_enabled(args) -> bool:
    """Progress bars go to stderr, only for humans at a terminal, from process 0 only."""
    return not getattr(args, "json", False) and sys.stderr.isatty() and is_primary()


def emit(args, result: dict[str, Any], human: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result))
    else:
        print(human)


def read_text(path: str, flag: str = "--text") -> str:
    """The UTF-8 text of ``path``, or a JaxarithError naming the flag and the file."""
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a directory; give a UTF-8 text file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{flag} {path}: not UTF-8 text (byte {e.start}: "
                          f"{e.object[e.start:e.start + 1]!r}); convert it to UTF-8") from None


def check_positive(**values: int | None) -> None:
    """Raise a ConfigError naming the first flag whose value is given and below 1."""
    for name, v in values.items():
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {v}: must be at least 1")


# distributed runs started without a cluster: jax.distributed's own message names no remedy
_NO_CLUSTER = ("coordinator_address should be defined",)


def _message(e: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for an exception that ends a command."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C); unfinished outputs were removed", 130
    if isinstance(e, Terminated):
        return f"{e}; unfinished outputs were removed", 128 + e.signum
    if isinstance(e, BrokenPipeError):
        return "output closed before the end (broken pipe)", 141
    if isinstance(e, ValueError) and any(m in str(e) for m in _NO_CLUSTER):
        return ("the config sets distributed: true, which needs a multi-host cluster that "
                "jax.distributed detects (a Cloud TPU pod slice, SLURM, ...); on one machine add "
                f"the override distributed=false (jax: {e})"), 2
    if isinstance(e, OSError) and e.filename and not isinstance(e, JaxarithError):
        return f"{e.strerror}: {os.fspath(e.filename)}", 2
    return str(e), 2


_HANDLED = (JaxarithError, FileNotFoundError, FileExistsError, PermissionError,
            IsADirectoryError, NotADirectoryError, KeyboardInterrupt, Terminated,
            BrokenPipeError)


def run(args) -> int:
    """Join the multi-process run the flags ask for (:mod:`jaxarith.distributed`), then call the
    subcommand's handler; an error on input becomes one line and a non-zero exit.

    A ``JaxarithError`` (or a missing / unreadable file, a distributed config run without a
    cluster) exits 2; Ctrl-C 130; SIGTERM 143; a closed stdout (``jaxarith inspect X | head``)
    141. Under ``--json`` the line is ``{"error": ..., "type": ...}`` on stdout.
    """
    set_allow_nonfinite(getattr(args, "allow_nonfinite", False))
    try:
        with terminate_as_exception():
            # join a multi-process run (--coordinator / --distributed) before any other JAX call
            distributed.setup_from_args(args)
            code = int(args.handler(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
            return code
    except BaseException as e:
        if not isinstance(e, _HANDLED) and not (
                isinstance(e, ValueError) and any(m in str(e) for m in _NO_CLUSTER)):
            raise
        msg, code = _message(e)
        if isinstance(e, BrokenPipeError):
            # stdout is gone: silence the interpreter's own flush at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            print(f"jaxarith {args.command}: {msg}", file=sys.stderr)
            return code
        if not distributed.is_primary():  # stdout is process 0's: name this process on stderr
            print(f"{distributed.error_prefix()}jaxarith {args.command}: error: {msg}",
                  file=sys.stderr, flush=True)
        elif getattr(args, "json", False):
            try:
                print(json.dumps({"error": msg, "type": type(e).__name__}), flush=True)
            except BrokenPipeError:
                pass
        else:
            print(f"jaxarith {args.command}: error: {msg}", file=sys.stderr)
        return code
