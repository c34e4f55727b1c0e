"""``jaxarith train CONFIG.yaml [key=value ...]``: the training program (same as
``python -m train``)."""

from __future__ import annotations

from train.__main__ import add_arguments, handle


def register(sub) -> None:
    p = sub.add_parser("train", help="continued pre-training / training from scratch (YAML config)",
                       description=__doc__)
    add_arguments(p)
    p.set_defaults(handler=handle)
