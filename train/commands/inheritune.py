"""``jaxarith inheritune CONFIG.yaml [key=value ...]``: the Inheritune grow loop (same as
``python -m train.inheritune``): train students inherited from a reference's first n layers, n
growing until one matches the reference's held-out loss."""

from __future__ import annotations

from train.inheritune import add_arguments, handle


def register(sub) -> None:
    p = sub.add_parser("inheritune", help="Inheritune grow loop: inherit, train, grow until the "
                       "student matches its reference", description=__doc__)
    add_arguments(p)
    p.set_defaults(handler=handle)
