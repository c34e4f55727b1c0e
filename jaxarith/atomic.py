"""Atomic outputs: write into a temporary sibling, rename into place only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from jaxarith.errors import JaxarithError


class OutputExistsError(JaxarithError, FileExistsError):
    pass


def check_destination(dst: str | os.PathLike, overwrite: bool = False) -> str:
    """Refuse an existing ``dst`` (unless ``overwrite``) and an unwritable parent, before work."""
    dst = os.path.abspath(os.fspath(dst))
    if os.path.lexists(dst) and not overwrite:
        raise OutputExistsError(f"{dst} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise JaxarithError(f"cannot write to {parent}: permission denied")
    return dst


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory next to ``dst``; on success it replaces ``dst``.

    On any exception the temporary directory is removed and ``dst`` is left as it was.

    Example::

        with atomic_dir("out/model") as tmp:
            write_files(tmp)
    """
    dst = check_destination(dst, overwrite)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=os.path.dirname(dst))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(dst):  # overwrite: move the old one aside, then swap
        old = tmp + ".old"
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
