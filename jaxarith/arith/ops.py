"""The per-tensor formulas of delta arithmetic and merging, each written once.

Every function here takes float32 arrays of one tensor (for stacked parameters: one layer's slice)
and returns a float32 array of the same shape. Both executors call these same objects: the
in-memory one (``memory.py``) vmaps them over the stacked ``layers`` axis of sharded arrays under
``jax.jit``; the streamed one (``stream.py``) jits them on one HF tensor at a time. Reductions
(TIES trimming, SLERP angles) are therefore per tensor *and per layer*, like mergekit, which works
on the per-layer tensors of HF checkpoints.

Shapes: ``[*S]`` is the tensor's shape, ``M`` the number of models merged into a base.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Below this |sum of weights| a normalising divisor is replaced by 1 (mergekit's guard).
DIVISOR_EPS = 1e-8


def delta(a: Array, b: Array) -> Array:
    """``a - b``: the task vector of a tuned model ``a`` over its base ``b``."""
    return a - b


def add(a: Array, b: Array) -> Array:
    """``a + b``."""
    return a + b


def scale(x: Array, s: Array) -> Array:
    """``s * x``."""
    return x * s


def lerp(a: Array, b: Array, t: Array) -> Array:
    """``(1 - t) a + t b``: exactly ``a`` at ``t = 0`` and exactly ``b`` at ``t = 1``."""
    return (1 - t) * a + t * b


def apply_delta(x: Array, d: Array, s: Array = 1.0) -> Array:
    """``x + s * d``: re-add a task vector (``s = 1`` multiplies exactly, so it is ``x + d``)."""
    return x + s * d


def linear(xs: Array, weights: Array, normalize: bool = True) -> Array:
    """Weighted sum of ``xs [M, *S]`` with ``weights [M]``, divided by the weights' sum if asked.

    A weight sum below 1e-8 in magnitude divides by 1 instead. Uniform weights give the soup.
    """
    total = _unrolled_sum([xs[i] * weights[i] for i in range(xs.shape[0])])
    if normalize:
        div = _unrolled_sum(list(weights))
        total = total / jnp.where(jnp.abs(div) < DIVISOR_EPS, 1.0, div)
    return total


def _unrolled_sum(terms: list[Array]) -> Array:
    """Sum over models as one elementwise expression rather than a reduce: XLA then fuses (and
    contracts to FMA) the same way on any sharding and under vmap, keeping executors bit-equal."""
    total = terms[0]
    for x in terms[1:]:
        total = total + x
    return total


def keep_count(density: float, numel: int) -> int:
    """How many entries a magnitude trim at ``density`` keeps: ``max(1, int(density * numel))``.

    ``density >= 1`` keeps all, ``density <= 0`` none (mergekit's rule). Computed on the host
    from the config's Python float (never a float32 copy: ``float32(0.7) < 0.7``, so
    ``int(float32(0.7) * 30720) = 21503`` where mergekit keeps 21504), so both executors and
    mergekit agree on the count exactly.
    """
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


# How one canonical tensor sits in its HF tensor, so that the position order of TIES'
# tie-breaking is HF's, as mergekit sees it. ``(split, transposed)``: view the
# canonical tensor as ``[prod(shape[:split]), prod(shape[split:])]``; HF's row-major order is that
# matrix's (``transposed=False``) or its transpose's (``True``), and HF's rows are its rows (resp.
# columns). ``None``: the tensor is its own HF layout (rows along the first axis). Computed from
# the keymap by ``layout.hf_layouts``.
Layout = tuple[int, bool] | None


def _as_matrix(x: Array, layout: Layout) -> tuple[Array, bool]:
    """``x`` as a matrix whose rows (``transposed=False``) or columns (``True``) are HF's rows."""
    split, transposed = layout if layout is not None else (min(1, x.ndim), False)
    a = int(np.prod(x.shape[:split], dtype=np.int64))
    return x.reshape(a, -1), transposed


def magnitude_mask(x: Array, k: Array, layout: Layout = None, thr: Array | None = None,
                   cut: Array | None = None) -> Array:
    """Boolean mask of the ``k`` entries of largest ``|x|``, exactly ``k`` (mergekit's trim).

    The threshold is the ``k``-th largest magnitude, found exactly without a sort: the float32
    bit pattern of a non-negative number is monotone in its value, so a 31-step bisection over
    the bit patterns finds it with one counting pass per step (memory-bound; integer counts are
    the same on any sharding). Every entry above it is kept and, of the entries equal to it, the
    first ones in HF's row-major order (``layout``, one running count) up to ``k`` in total. So
    the kept set is deterministic and the same on any sharding or batching; ``k = 0`` keeps
    nothing; ``k`` may be traced (per-layer schedules). On this CPU a 4M-entry tensor takes
    ~2x the old keep-all-ties threshold, ~5x less than a full sort (``jnp.sort``).

    ``thr``, when given, is that threshold already found (a ``uint32`` bit pattern, e.g. by
    :func:`host_threshold` in one selection pass on the host: the streamed executor's route,
    ~10x faster than the bisection there); the k-th largest value is unique, so the mask is the
    same whichever way it was found. ``cut`` (with ``thr``, for a tensor in its own HF layout,
    ``layout=None``) is the row-major position of the last tied entry kept (-1: none), found
    with ``thr``: the tied entries kept are then those at or before it, the same set as the
    running count picks, without the count (a scan: the costliest part of the mask on CPU).
    """
    bits = jax.lax.bitcast_convert_type(jnp.abs(x), jnp.uint32)  # [*S]
    k = jnp.asarray(k, jnp.int32)

    def step(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits >= mid, dtype=jnp.int32) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    if thr is None:
        # Invariant: count(bits >= lo) >= k and count(bits >= hi) < k (hi = 2^31 > any finite
        # |x|); at the end hi = lo + 1, so lo is exactly the k-th largest bit pattern.
        thr, _ = jax.lax.fori_loop(0, 31, step, (jnp.uint32(0), jnp.uint32(1 << 31)))
    else:
        thr = jnp.asarray(thr, jnp.uint32)
    above = bits > thr
    at = bits == thr
    if cut is not None:
        pos = jax.lax.broadcasted_iota(jnp.int32, (x.size,), 0).reshape(x.shape)
        return (above | (at & (pos <= cut))) & (k > 0)
    room = k - jnp.sum(above, dtype=jnp.int32)  # how many tied entries still fit
    m, transposed = _as_matrix(at, layout)
    if transposed:
        rank = jnp.cumsum(m.T.reshape(-1).astype(jnp.int32)).reshape(m.T.shape).T
    else:
        rank = jnp.cumsum(m.reshape(-1).astype(jnp.int32)).reshape(m.shape)
    keep = above | (at & (rank.reshape(x.shape) <= room))
    return keep & (k > 0)


def host_threshold(x: np.ndarray, k: int) -> tuple[np.uint32, np.int32]:
    """``thr`` and ``cut`` of :func:`magnitude_mask` by one selection pass on the host.

    Args:
      x: a float32 numpy array in its HF layout (row-major = HF order), e.g. a task vector, or
        its ``|x|`` bit patterns as ``uint32``; k: how many entries the trim keeps.
    Returns:
      (the float32 bit pattern of the ``k``-th largest ``|x|`` as ``uint32``, the row-major
      position of the last entry equal to it that is kept, -1 if none); (0, -1) when
      ``k <= 0`` (the mask keeps nothing).
    """
    bits = x.reshape(-1) if x.dtype == np.uint32 else np.abs(x.reshape(-1)).view(np.uint32)
    n = bits.size
    if k <= 0 or n == 0:
        return np.uint32(0), np.int32(-1)
    k = min(int(k), n)
    thr = np.partition(bits, n - k)[n - k]  # one introselect pass over a copy
    room = k - int(np.count_nonzero(bits > thr))  # >= 1: count(bits >= thr) >= k
    return np.uint32(thr), np.int32(np.flatnonzero(bits == thr)[room - 1])


def random_mask(key: Array, density: Array, shape: tuple[int, ...]) -> Array:
    """Bernoulli keep-mask, keep probability ``density`` (drop probability ``p = 1 - density``)."""
    return jax.random.bernoulli(key, density, shape)


def sparsify(x: Array, *, method: str | None, k: Array, density: Array, key: Array,
             rescale: bool, layout: Layout = None, thr: Array | None = None,
             cut: Array | None = None) -> Array:
    """Trim one task vector: ``"magnitude"`` (TIES: keep the top ``k``) or ``"random"`` (DARE:
    keep each entry with probability ``density``, rescaled by ``1 / density`` = ``1 / (1 - p)``
    when ``rescale``); ``None`` returns ``x``. ``thr``, ``cut``: see :func:`magnitude_mask`."""
    if method is None:
        return x
    if method == "magnitude":
        return jnp.where(magnitude_mask(x, k, layout, thr, cut), x, 0.0)
    if method == "random":
        kept = jnp.where(random_mask(key, density, x.shape), x, 0.0)
        if rescale:
            kept = kept / jnp.where(density > 0, density, 1.0)
        return kept
    raise ValueError(f"unknown sparsification {method!r}")


def sign_consensus(tvs: Array, method: str = "sum") -> Array:
    """TIES sign election over ``tvs [M, *S]``: mask of entries whose sign is the elected one.

    ``"sum"`` elects the sign of the summed (weighted) task vectors, ``"count"`` the sign held by
    more models; a tie elects ``+``. Zero entries never agree (their sign is 0).
    """
    if method == "sum":
        votes = _unrolled_sum(list(tvs))
    elif method == "count":
        votes = _unrolled_sum(list(jnp.sign(tvs)))
    else:
        raise ValueError(f"unknown consensus {method!r}")
    elected = jnp.where(votes >= 0, 1.0, -1.0)
    return jnp.sign(tvs) == elected


def task_merge(
    base: Array,
    models: Array,
    weights: Array,
    lam: Array,
    *,
    ks: Array,
    densities: Array,
    keys: Array,
    sparsification: str | None,
    consensus: str | None,
    normalize: bool,
    rescale: bool = True,
    layout: Layout = None,
    thrs: Array | None = None,
    cuts: Array | None = None,
) -> Array:
    """Generalised task arithmetic: ``base + lam * merge_i(w_i * trim(models_i - base))``.

    - task arithmetic: no trim, no consensus, plain sum (``normalize`` divides by ``sum w``);
    - TIES: magnitude trim to ``ks``, sign election, disjoint (weighted) mean when ``normalize``;
    - DARE: random trim with ``1/density`` rescale, then linear (``dare_linear``) or TIES
      combination (``dare_ties``).

    Args:
      base: ``[*S]``; models: ``[M, *S]``; weights, densities: ``[M]`` float; ks: ``[M]`` int
        (entries kept by a magnitude trim, see :func:`keep_count`); keys: ``[M, 2]`` PRNG keys.
      thrs, cuts: ``[M]`` uint32 magnitude thresholds of the trims and int32 tie cuts when
        already known (:func:`host_threshold`); None: :func:`magnitude_mask` finds them.
    Returns:
      The merged tensor ``[*S]``. With consensus, an entry where no model agrees with the elected
      sign gets divisor 1 (so a zero update); without, ``|sum w| < 1e-8`` divides by 1.
    """
    w = weights.reshape((-1,) + (1,) * base.ndim)  # [M, 1...]
    known = thrs is not None and sparsification == "magnitude"
    thrs = jnp.zeros(ks.shape, jnp.uint32) if thrs is None else thrs
    cut = cuts is not None and known
    cuts = jnp.zeros(ks.shape, jnp.int32) if cuts is None else cuts
    tvs = jax.vmap(
        lambda m, k, d, key, t, c: sparsify(m - base, method=sparsification, k=k, density=d,
                                            key=key, rescale=rescale, layout=layout,
                                            thr=t if known else None, cut=c if cut else None)
    )(models, ks, densities, keys, thrs, cuts) * w  # [M, *S]
    m = tvs.shape[0]
    if consensus is not None:
        agree = sign_consensus(tvs, consensus)
        mixed = _unrolled_sum([jnp.where(agree[i], tvs[i], 0.0) for i in range(m)])
        divisor = _unrolled_sum([jnp.where(agree[i], weights[i], 0.0) for i in range(m)])
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = _unrolled_sum([tvs[i] for i in range(m)])
        divisor = _unrolled_sum([weights[i] for i in range(m)])
        divisor = jnp.where(jnp.abs(divisor) < DIVISOR_EPS, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def slerp(a: Array, b: Array, t: Array, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> Array:
    """Spherical interpolation of two tensors seen as single vectors; ``t = 0`` gives ``a``.

    As mergekit 0.1.5 does: one angle per tensor (per layer), not per row (tested against it).

    Falls back to :func:`lerp` when the normalised vectors are nearly parallel or antiparallel
    (``|cos| > dot_threshold``) and treats a norm below ``eps`` as 1, so no division by zero.
    """
    # Products of float32 are exact in float64 and float64 sums are order-independent to ~1e-16,
    # so the angle rounds to the same float32 on any sharding or batching (needs x64 enabled by
    # the executor; without it this is float32).
    acc = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    a64, b64 = a.astype(acc), b.astype(acc)
    na = jnp.sqrt(jnp.sum(a64 * a64))
    nb = jnp.sqrt(jnp.sum(b64 * b64))
    dot = jnp.sum(a64 * b64)
    na = jnp.where(na > eps, na, 1.0)
    nb = jnp.where(nb > eps, nb, 1.0)
    cos = jnp.clip(dot / (na * nb), -1.0, 1.0).astype(jnp.float32)
    parallel = jnp.abs(cos) > dot_threshold
    theta = jnp.arccos(jnp.where(parallel, 0.0, cos))
    sin_theta = jnp.where(parallel, 1.0, jnp.sin(theta))
    ca = jnp.where(parallel, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
    cb = jnp.where(parallel, t, jnp.sin(t * theta) / sin_theta)
    return ca * a + cb * b
