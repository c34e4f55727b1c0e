"""Delta arithmetic and merging over canonical parameter trees.

Every operation is one per-tensor formula (``ops.py``) run by two executors: in memory under
``jax.jit`` over (sharded) trees (``memory.run``, used by the functions below) and streamed over
HF safetensors checkpoints (``stream.run_streamed``). Math is float32; results are cast to the
first input's dtype (a delta stays float32).

Example::

    from jaxarith import arith
    tau = arith.delta(instruct, base, cfg)                 # float32 task vector
    final = arith.apply_delta(trained, tau, cfg)           # re-add it
    merged = arith.ties(base, [m1, m2], cfg, weights=[1, 1], densities=[0.5, 0.5])
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxarith.arith.memory import run
from jaxarith.arith.methods import Kind, Method, method
from jaxarith.arith.select import MergeSpec, Selection, Setting
from jaxarith.arith.stream import run_streamed

__all__ = ["Kind", "MergeSpec", "Method", "Selection", "add", "apply_delta", "dare", "delta",
           "lerp", "merge", "method", "run", "run_streamed", "scale", "slerp", "soup",
           "task_arithmetic", "ties"]


def _sel(include, exclude) -> Selection:
    return Selection(include=tuple(include or ()), exclude=tuple(exclude or ()))


def _per_model(n: int, **settings) -> tuple[dict, ...]:
    out = [{} for _ in range(n)]
    for name, values in settings.items():
        if values is None:
            continue
        if len(values) != n:
            raise ValueError(f"{name}: {len(values)} values for {n} models")
        for d, v in zip(out, values, strict=True):
            d[name] = v
    return tuple(out)


def merge(method_name: str, trees: Sequence[dict], cfg=None, *, shared=None, per_model=(),
          include=(), exclude=(), seed: int = 0, dtype=None, donate: bool = False,
          **options) -> dict:
    """Run any method by name in memory (``options`` go to :class:`Method`)."""
    spec = MergeSpec(method=method(method_name, **options), shared=dict(shared or {}),
                     per_model=tuple(per_model), selection=_sel(include, exclude), seed=seed)
    return run(spec, cfg, trees, dtype=dtype, donate=donate)


def delta(tuned: dict, base: dict, cfg=None, *, include=(), exclude=(), dtype=None) -> dict:
    """``tuned - base`` in float32 (kept float32 unless ``dtype``); unselected tensors are 0."""
    return merge("delta", [tuned, base], cfg, include=include, exclude=exclude, dtype=dtype)


def add(a: dict, b: dict, cfg=None, **kw) -> dict:
    """``a + b``."""
    return merge("add", [a, b], cfg, **kw)


def scale(x: dict, s: Setting, cfg=None, **kw) -> dict:
    """``s * x``; ``s`` may be a per-layer schedule."""
    return merge("scale", [x], cfg, shared={"scale": s}, **kw)


def lerp(a: dict, b: dict, t: Setting, cfg=None, **kw) -> dict:
    """``(1 - t) a + t b``."""
    return merge("lerp", [a, b], cfg, shared={"t": t}, **kw)


def apply_delta(model: dict, delta_tree: dict, cfg=None, scale: Setting = 1.0, *,
                donate: bool = False, **kw) -> dict:
    """``model + scale * delta``, in the model's dtype; ``donate`` reuses the model's buffers."""
    return merge("apply_delta", [model, delta_tree], cfg, shared={"scale": scale},
                 donate=donate, **kw)


def task_arithmetic(base: dict, models: Sequence[dict], cfg=None, *, weights=None,
                    lam: Setting = 1.0, normalize: bool = False, **kw) -> dict:
    """``base + lam * sum_i w_i (models_i - base)``."""
    return merge("task_arithmetic", [base, *models], cfg, shared={"lambda": lam},
                 per_model=_per_model(len(models), weight=weights), normalize=normalize, **kw)


def ties(base: dict, models: Sequence[dict], cfg=None, *, weights=None, densities=None,
         lam: Setting = 1.0, normalize: bool = True, consensus: str = "sum", **kw) -> dict:
    """TIES: trim each task vector to its top-``density`` magnitudes, elect signs by sum, merge
    the agreeing entries (weighted mean when ``normalize``)."""
    return merge("ties", [base, *models], cfg, shared={"lambda": lam},
                 per_model=_per_model(len(models), weight=weights, density=densities),
                 normalize=normalize, consensus=consensus, **kw)


def dare(base: dict, models: Sequence[dict], cfg=None, *, weights=None, densities=None,
         lam: Setting = 1.0, combine: str = "linear", seed: int = 0, normalize=None,
         rescale: bool = True, **kw) -> dict:
    """DARE: drop each task-vector entry with probability ``1 - density`` (seeded), rescale the
    rest by ``1 / density``, then combine linearly (``"linear"``) or with TIES (``"ties"``)."""
    if combine not in ("linear", "ties"):
        raise ValueError(f"combine={combine!r}: expected 'linear' or 'ties'")
    return merge(f"dare_{combine}", [base, *models], cfg, shared={"lambda": lam},
                 per_model=_per_model(len(models), weight=weights, density=densities),
                 seed=seed, normalize=normalize, rescale=rescale, **kw)


def slerp(a: dict, b: dict, t: Setting, cfg=None, **kw) -> dict:
    """Spherical interpolation per tensor (per layer); ``t = 0`` is ``a``."""
    return merge("slerp", [a, b], cfg, shared={"t": t}, **kw)


def soup(models: Sequence[dict], cfg=None, *, weights=None, **kw) -> dict:
    """Uniform (or weighted, normalised) average of models."""
    return merge("linear", list(models), cfg,
                 per_model=_per_model(len(models), weight=weights), **kw)
