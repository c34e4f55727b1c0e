"""How far apart two models are: the measure of "Doing Pre-training Research on Instruction Models".

For a tree of weights ``w`` with ``N`` entries in total:

- ``abs``:    ``sum |w| / N``
- ``square``: ``sum w^2 / N``

The report compares a base, another model (e.g. the instruct one) and their difference
``other - base``, with the ratios base/other, diff/other and diff/base, broken down per tensor and
per layer. :func:`delta_cosine` is the cosine between two deltas (e.g. a training update and the
instruct delta; ``delta norms --cosine``). Checkpoints are streamed one tensor at a time; sums
are float64.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator

import numpy as np

from jaxarith.arith.check import check_shapes
from jaxarith.arith.stream import open_checkpoints
from jaxarith.errors import ConfigError
from jaxarith.io.convert.hf import params_to_hf_tensors
from jaxarith.io.convert.keymap import expand, rules_for
from jaxarith.io.refs import RefKind, load_model, ref_kind

MEASURES = ("abs", "square")


def _stat(x: np.ndarray, measure: str) -> float:
    x = np.asarray(x, np.float64)
    return float(np.abs(x).sum()) if measure == "abs" else float(np.square(x).sum())


def named_tensors(ref: str) -> tuple[object, Iterator[tuple[str, int | None, np.ndarray]]]:
    """(config, iterator of (HF name, layer, array)) for any model reference, one at a time.

    HF checkpoints are read tensor by tensor; an Orbax checkpoint is restored, then walked.
    """
    if ref_kind(ref) is RefKind.ORBAX:
        model = load_model(ref, progress=False)
        cfg = model.config
        layers = {k: i for r in rules_for(cfg) for k, i in expand(r, cfg.num_hidden_layers)}
        return cfg, ((k, layers[k], a) for k, a in params_to_hf_tensors(cfg, model.params))
    (cfg,), (ckpt,), (names,) = open_checkpoints([ref])
    items = [(k, i) for r in rules_for(cfg) for k, i in expand(r, cfg.num_hidden_layers)]
    return cfg, ((k, i, ckpt.get(names[k])) for k, i in items)


def _pairs(base: str, other: str):
    cb, ib = named_tensors(base)
    co, io = named_tensors(other)
    shapes = []
    for c in (cb, co):
        shapes.append({k: r.hf_shape for r in rules_for(c)
                       for k, _ in expand(r, c.num_hidden_layers)})
    check_shapes(shapes, [base, other])
    return zip(ib, io, strict=True)


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


def norms_report(base: str, other: str, measure: str = "abs", *, per_layer: bool = False,
                 per_tensor: bool = False) -> dict:
    """The blog's report for two model references (``diff = other - base``).

    Returns:
      {"measure", "base_norm", "other_norm", "diff_norm", "base_over_other", "diff_over_other",
      "diff_over_base", "numel"} and, when asked, "per_layer" (list, one entry per layer plus
      ``"layer": null`` for tensors outside the layers) and "per_tensor" ({HF name: entry}).
    """
    if measure not in MEASURES:
        raise ConfigError(f"measure {measure!r}: expected one of {MEASURES}")
    total = np.zeros(3)
    n = 0
    by_layer: dict = collections.defaultdict(lambda: np.zeros(4))
    by_tensor = {}
    for (key, layer, b), (_, _, o) in _pairs(base, other):
        b64, o64 = np.asarray(b, np.float64), np.asarray(o, np.float64)
        s = np.array([_stat(b64, measure), _stat(o64, measure), _stat(o64 - b64, measure)])
        total += s
        n += b.size
        by_layer[layer] += np.append(s, b.size)
        if per_tensor:
            by_tensor[key] = _entry(s, b.size)
    out = {"measure": measure, **_entry(total, n), "numel": n}
    if per_layer:
        order = sorted(by_layer, key=lambda x: -1 if x is None else x)
        out["per_layer"] = [{"layer": k, **_entry(by_layer[k][:3], by_layer[k][3])}
                            for k in order]
    if per_tensor:
        out["per_tensor"] = by_tensor
    return out


def _entry(sums: np.ndarray, n) -> dict:
    bn, on, dn = (float(x) / n for x in sums)
    return {"base_norm": bn, "other_norm": on, "diff_norm": dn,
            "base_over_other": _ratio(bn, on), "diff_over_other": _ratio(dn, on),
            "diff_over_base": _ratio(dn, bn)}


def delta_cosine(tuned_a: str, base_a: str, tuned_b: str, base_b: str | None = None) -> float:
    """Cosine between ``tuned_a - base_a`` and ``tuned_b - base_b`` (``base_b`` defaults to
    ``base_a``), over all tensors; e.g. a training update against the instruct delta."""
    base_b = base_b or base_a
    dot = na = nb = 0.0
    for ((_, _, ba), (_, _, ta)), ((_, _, bb), (_, _, tb)) in zip(
            _pairs(base_a, tuned_a), _pairs(base_b, tuned_b), strict=True):
        da = np.asarray(ta, np.float64) - np.asarray(ba, np.float64)
        db = np.asarray(tb, np.float64) - np.asarray(bb, np.float64)
        dot += float(np.vdot(da, db))
        na += float(np.vdot(da, da))
        nb += float(np.vdot(db, db))
    return dot / math.sqrt(na * nb) if na and nb else 0.0
