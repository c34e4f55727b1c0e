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
    total = _model_sum(lambda i: xs[i] * weights[i], xs.shape[0])
    if normalize:
        div = _model_sum(lambda i: weights[i], weights.shape[0])
        total = total / jnp.where(jnp.abs(div) < DIVISOR_EPS, 1.0, div)
    return total


def _unrolled_sum(terms: list[Array]) -> Array:
    """Sum over models as one elementwise expression rather than a reduce: XLA then fuses (and
    contracts to FMA) the same way on any sharding and under vmap, keeping executors bit-equal."""
    total = terms[0]
    for x in terms[1:]:
        total = total + x
    return total


# Above this many models a sum over models is a loop (see _model_sum).
UNROLL_MAX = 32


def _model_sum(term, m: int) -> Array:
    """``term(0) + term(1) + ... + term(m - 1)``, added left to right.

    Up to :data:`UNROLL_MAX` models this is :func:`_unrolled_sum` (one fused expression). Above,
    it is a ``fori_loop`` adding one model per step in the same order: an unrolled expression of
    thousands of terms compiles in time that grows faster than the number of models (2000
    inputs of a streamed merge spent minutes compiling), a loop compiles once. Both executors
    call this with the same ``m``, so they stay bit-equal at any count.
    """
    if m <= UNROLL_MAX:
        return _unrolled_sum([term(i) for i in range(m)])
    first = term(0)
    return jax.lax.fori_loop(1, m, lambda i, t: t + term(i).astype(t.dtype), first)


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


def order_statistic(x: Array, k: int) -> Array:
    """The ``k``-th smallest entry (0-based) of ``x`` flattened: ``jnp.sort(x.reshape(-1))[k]``
    exactly, without a sort. float32 entries map to uint32 keys in the same order (sign bit
    flipped for non-negatives, every bit for negatives), and a 32-step bisection over the keys
    counts entries below the midpoint (one pass each; XLA's CPU sort of a 65M-entry tensor took
    most of an Arcee Fusion merge)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32).reshape(-1), jnp.uint32)
    key = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))
    target = jnp.int32(k + 1)

    def step(_, lo_hi):
        lo, hi = lo_hi  # invariant: count(key <= lo - 1) < k + 1 <= count(key <= hi)
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(key <= mid, dtype=jnp.int32) >= target
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    lo, _ = jax.lax.fori_loop(0, 32, step, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
    out = jnp.where(lo >> 31 == 1, lo & jnp.uint32(0x7FFFFFFF), ~lo)
    return jax.lax.bitcast_convert_type(out, jnp.float32)


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
             cut: Array | None = None, k_lo: Array | None = None,
             epsilon: Array | None = None) -> Array:
    """Trim one task vector: ``"magnitude"`` (TIES: keep the top ``k``; L1-rescaled when
    ``rescale``, as mergekit's ``rescale: true``) or ``"random"`` (DARE:
    keep each entry with probability ``density``, rescaled by ``1 / density`` = ``1 / (1 - p)``
    when ``rescale``); ``None`` returns ``x``. ``thr``, ``cut``: see :func:`magnitude_mask`.

    mergekit 0.1.5's others, rescaled to the task vector's L1 norm when ``rescale``
    (:func:`l1_rescale`): ``"magnitude_outliers"`` (Model Breadcrumbs: the top ``k`` but not
    the top ``k_lo``, see :func:`outlier_counts`) and ``"della_magprune"`` (DELLA: keep with the
    rank-dependent probability of :func:`della_probs`, ``epsilon`` around ``density``; density
    ``>= 1`` keeps all, ``<= 0`` none).
    """
    if method is None:
        return x
    if method == "magnitude":
        kept = jnp.where(magnitude_mask(x, k, layout, thr, cut), x, 0.0)
        return l1_rescale(x, kept) if rescale else kept
    if method == "random":
        kept = jnp.where(random_mask(key, density, x.shape), x, 0.0)
        if rescale:
            kept = kept / jnp.where(density > 0, density, 1.0)
        return kept
    if method == "magnitude_outliers":
        keep = magnitude_mask(x, k, layout) & ~magnitude_mask(x, k_lo, layout)
        kept = jnp.where(keep, x, 0.0)
        return l1_rescale(x, kept) if rescale else kept
    if method == "della_magprune":
        probs = della_probs(x, density, epsilon, layout)
        keep = jax.random.uniform(key, x.shape, jnp.float32) < probs  # float32 under x64 too
        kept = jnp.where(keep, x, 0.0)
        kept = l1_rescale(x, kept) if rescale else kept
        return jnp.where(density >= 1, x, jnp.where(density <= 0, 0.0, kept))
    raise ValueError(f"unknown sparsification {method!r}")


def sign_consensus(tvs: Array, method: str = "sum") -> Array:
    """TIES sign election over ``tvs [M, *S]``: mask of entries whose sign is the elected one.

    ``"sum"`` elects the sign of the summed (weighted) task vectors, ``"count"`` the sign held by
    more models; a tie elects ``+``. Zero entries never agree (their sign is 0).
    """
    if method == "sum":
        votes = _model_sum(lambda i: tvs[i], tvs.shape[0])
    elif method == "count":
        votes = _model_sum(lambda i: jnp.sign(tvs[i]), tvs.shape[0])
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
    k_los: Array | None = None,
    epsilons: Array | None = None,
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
      k_los, epsilons: ``[M]`` Model Breadcrumbs' outlier counts, DELLA's epsilons (see
        :func:`sparsify`).
    Returns:
      The merged tensor ``[*S]``. With consensus, an entry where no model agrees with the elected
      sign gets divisor 1 (so a zero update); without, ``|sum w| < 1e-8`` divides by 1.
    """
    w = weights.reshape((-1,) + (1,) * base.ndim)  # [M, 1...]
    known = thrs is not None and sparsification == "magnitude"
    thrs = jnp.zeros(ks.shape, jnp.uint32) if thrs is None else thrs
    cut = cuts is not None and known
    cuts = jnp.zeros(ks.shape, jnp.int32) if cuts is None else cuts
    k_los = jnp.zeros(ks.shape, jnp.int32) if k_los is None else k_los
    epsilons = jnp.zeros(ks.shape, jnp.float32) if epsilons is None else epsilons
    tvs = jax.vmap(
        lambda m, k, d, key, t, c, kl, e: sparsify(
            m - base, method=sparsification, k=k, density=d, key=key, rescale=rescale,
            layout=layout, thr=t if known else None, cut=c if cut else None, k_lo=kl, epsilon=e)
    )(models, ks, densities, keys, thrs, cuts, k_los, epsilons) * w  # [M, *S]
    m = tvs.shape[0]
    if consensus is not None:
        agree = sign_consensus(tvs, consensus)
        mixed = _model_sum(lambda i: jnp.where(agree[i], tvs[i], 0.0), m)
        divisor = _model_sum(lambda i: jnp.where(agree[i], weights[i], 0.0), m)
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = _model_sum(lambda i: tvs[i], m)
        divisor = _model_sum(lambda i: weights[i], m)
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


# --------------------------------------------------------------- mergekit 0.1.5's other methods
# Each follows mergekit 0.1.5's formula for one HF tensor (``mergekit/merge_methods/*.py``,
# ``mergekit/sparsify.py``). Where mergekit reduces along a row it is an HF row (``dim=-1`` of
# ``[out, in]``; a 1-D tensor is one row): ``layout`` says where HF's rows run in the canonical
# tensor. Sums over a whole tensor or row are accumulated in float64 when the executor enables
# x64 (``Method.wants_x64``): float32 products are exact there and the order of the sum then
# (almost) never changes the float32 result, so both executors agree on any sharding.


def _acc(x: Array) -> Array:
    return x.astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)


def _to_hf(x: Array, layout: Layout) -> Array:
    """``x`` as HF's ``[rows, cols]`` matrix (a 1-D tensor: one row)."""
    if x.ndim <= 1:
        return x.reshape(1, -1)
    m, transposed = _as_matrix(x, layout)
    return m.T if transposed else m


def _from_hf(m: Array, like: Array, layout: Layout) -> Array:
    """Inverse of :func:`_to_hf`."""
    if like.ndim <= 1:
        return m.reshape(like.shape)
    _, transposed = _as_matrix(like, layout)
    return (m.T if transposed else m).reshape(like.shape)


def nearswap(a: Array, b: Array, t: Array) -> Array:
    """NearSwap: move ``a`` towards ``b`` where they are already close.

    ``w = clip(t / max(|a - b|, 1e-6), 0, 1)``, result ``w b + (1 - w) a``: entries closer than
    ``t`` become ``b``, farther ones keep ``a`` in proportion to the distance.
    """
    w = jnp.clip(t / jnp.maximum(jnp.abs(a - b), 1e-6), 0.0, 1.0)
    return w * b + (1 - w) * a


def model_stock(base: Array, models: Array, filter_wise: bool = False,
                layout: Layout = None) -> Array:
    """Model Stock: interpolate between ``base`` and the models' mean by their offsets' angle.

    With ``cos`` the mean pairwise cosine of the offsets ``models_i - base`` (per tensor, or per
    HF row with ``filter_wise``) and ``N`` models, ``t = N cos / (1 + (N - 1) cos)`` and the
    result is ``t mean(models) + (1 - t) base``; where ``|1 + (N - 1) cos| < 1e-6``, ``t = 0``
    (the base). Norm products are clamped below at 1e-6, cosines to ``[-1, 1]``.

    Args:
      base: ``[*S]``; models: ``[N, *S]``, N >= 2.
    """
    n = models.shape[0]
    if filter_wise:
        w0, ws = _to_hf(base, layout), [_to_hf(m, layout) for m in models]  # [R, C]
        red = lambda x: jnp.sum(x, axis=-1)  # noqa: E731
    else:
        w0, ws = base.reshape(-1), [m.reshape(-1) for m in models]
        red = jnp.sum
    offs = [_acc(w - w0) for w in ws]
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            norms = jnp.sqrt(red(offs[i] * offs[i])) * jnp.sqrt(red(offs[j] * offs[j]))
            cos.append(jnp.clip(red(offs[i] * offs[j]) / jnp.maximum(norms, 1e-6), -1.0, 1.0))
    c = _unrolled_sum(cos) / len(cos)
    den = 1 + (n - 1) * c
    singular = jnp.abs(den) < 1e-6
    t = jnp.where(singular, 0.0, n * c / jnp.where(singular, 1.0, den)).astype(jnp.float32)
    if filter_wise:
        t = t[:, None]
    avg = _unrolled_sum(ws) / n
    out = t * avg + (1 - t) * w0
    return _from_hf(out, base, layout) if filter_wise else out.reshape(base.shape)


def outlier_counts(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """Model Breadcrumbs' trim as two magnitude counts ``(k_hi, k_lo)``: keep the ``k_hi``
    largest ``|x|`` but not the ``k_lo`` largest.

    mergekit 0.1.5 (``magnitude_outliers``): ``target = int(density n)`` entries kept, the
    ``int(gamma n)`` largest dropped first, fewer of them when both would not fit;
    ``density >= 1`` keeps everything. From the config's Python floats, like :func:`keep_count`.
    """
    if density >= 1:
        return numel, 0
    target = int(density * numel)
    n_bot = max(0, numel - target - int(gamma * numel))
    return max(0, numel - n_bot), max(0, numel - n_bot - target)


def l1_rescale(x: Array, kept: Array, eps: float = 1e-7) -> Array:
    """``kept`` (a masked ``x``) scaled to ``x``'s L1 norm, unless either norm is below ``eps``
    (mergekit's ``rescaled_masked_tensor`` with ``norm=l1``)."""
    before, after = jnp.sum(jnp.abs(_acc(x))), jnp.sum(jnp.abs(_acc(kept)))
    ok = (before >= eps) & (after >= eps)
    scale = jnp.where(ok, before / jnp.where(ok, after, 1.0), 1.0).astype(jnp.float32)
    return kept * scale


def _ranks(m: Array) -> Array:
    """Each entry's position in its row's stable ascending order (``argsort(argsort(m))``), by
    one sort and the inverse permutation (a scatter) instead of a second sort."""
    if m.ndim != 2:
        return jnp.argsort(jnp.argsort(m, axis=-1), axis=-1)
    order = jnp.argsort(m, axis=-1)
    rows = jnp.arange(m.shape[0])[:, None]
    pos = jnp.broadcast_to(jnp.arange(m.shape[1], dtype=jnp.int32)[None, :], m.shape)
    return jnp.zeros(m.shape, jnp.int32).at[rows, order].set(pos, unique_indices=True)


def della_probs(x: Array, density: Array, epsilon: Array, layout: Layout = None) -> Array:
    """DELLA's keep probabilities: per HF row, ``density - epsilon`` for the smallest ``|x|``
    rising linearly with the magnitude's rank to ``density + epsilon`` for the largest."""
    m = jnp.abs(_to_hf(x, layout))  # [R, C]
    rank = _ranks(m).astype(jnp.float32)  # 0..C-1
    cols = m.shape[-1]
    rank_norm = jnp.clip(rank / (cols - 1), 0.0, 1.0) if cols > 1 else jnp.full_like(m, jnp.nan)
    return _from_hf((density - epsilon) + rank_norm * 2 * epsilon, x, layout)


def sce(base: Array, models: Array, select_topk: Array, layout: Layout = None) -> Array:
    """SCE: select the entries where the models vary most, weight the models by their task
    vectors' mean square, merge the entries agreeing with the elected sign.

    ``tvs = models - base``; if ``select_topk < 1`` only the ``int(nnz(var) * select_topk)``
    entries of largest variance across models stay (the count in float32, as mergekit's torch
    scalar arithmetic); model weights ``mean(tv_i^2) / sum_j mean(tv_j^2)`` (uniform if that sum
    is below 1e-6); result ``base + sum_i w_i agree_i tv_i / max(sum_i w_i agree_i, 1e-6)``.
    """
    tvs = models - base  # [M, *S]
    m = tvs.shape[0]
    mean = _model_sum(lambda i: tvs[i], m) / m
    var = _model_sum(lambda i: (tvs[i] - mean) ** 2, m) / m
    nnz = jnp.sum(var != 0, dtype=jnp.int32)
    k = jnp.floor(nnz.astype(jnp.float32) * select_topk).astype(jnp.int32)
    keep = jnp.where(select_topk >= 1, True,
                     magnitude_mask(var, jnp.where(select_topk <= 0, 0, k), layout))
    tvs = jnp.where(keep, tvs, 0.0)
    agree = sign_consensus(tvs, "sum")
    sq = jax.vmap(lambda tv: jnp.sum(_acc(tv) * _acc(tv)) / tv.size)(tvs)
    total = jnp.sum(sq)
    w = jnp.where(jnp.abs(total) < 1e-6, 1.0 / m, sq / jnp.where(total == 0, 1.0, total))
    w = w.astype(jnp.float32)
    ew = jnp.where(agree, w.reshape((-1,) + (1,) * base.ndim), 0.0)  # [M, *S]
    merged = _model_sum(lambda i: tvs[i] * ew[i], m)
    return base + merged / jnp.maximum(_model_sum(lambda i: ew[i], m), 1e-6)


def _normalize_rows(x: Array, eps: float = 1e-7) -> Array:
    n = jnp.sqrt(jnp.sum(_acc(x) * _acc(x), axis=-1, keepdims=True))
    return (_acc(x) / jnp.maximum(n, eps))


def nuslerp_pair(t: Array, v0: Array, v1: Array, *, flatten: bool, row_wise: bool,
                 layout: Layout = None, eps: float = 1e-8) -> Array:
    """mergekit's ``nuslerp``: SLERP of ``v0`` and ``v1`` as whole vectors (``flatten``), per HF
    column (``row_wise``: along HF's first axis) or per HF row; lerp where colinear
    (``1 - cos^2 <= eps^2``). ``t = 0`` gives ``v0``."""
    row_wise = row_wise and v0.ndim > 1  # mergekit's transpose(0, -1) of a vector: itself
    if flatten:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    else:
        a, b = _to_hf(v0, layout), _to_hf(v1, layout)
        if row_wise:
            a, b = a.T, b.T
    cos = jnp.clip(jnp.sum(_normalize_rows(a) * _normalize_rows(b), axis=-1, keepdims=True),
                   -1.0, 1.0).astype(jnp.float32)
    colinear = (1 - cos * cos) <= eps ** 2
    theta = jnp.arccos(jnp.where(colinear, 0.0, cos))
    sin_theta = jnp.where(colinear, 1.0, jnp.sin(theta))
    out = (jnp.sin((1 - t) * theta) * a + jnp.sin(t * theta) * b) / sin_theta
    out = jnp.where(colinear, (1 - t) * a + t * b, out)
    if flatten:
        return out.reshape(v0.shape)
    return _from_hf(out.T if row_wise else out, v0, layout)


def nuslerp(xs: Array, weights: Array, *, has_base: bool, flatten: bool, row_wise: bool,
            layout: Layout = None) -> Array:
    """NuSLERP of two models (``xs [2, *S]``, or ``[3, *S]`` with a base first: their task
    vectors are slerped and added to it) at ``t = w_1 / (w_0 + w_1)`` (0.5 when that sum is below
    1e-6 in magnitude)."""
    total = weights[0] + weights[1]
    t = jnp.where(jnp.abs(total) < 1e-6, 0.5, weights[1] / jnp.where(total == 0, 1.0, total))
    kw = dict(flatten=flatten, row_wise=row_wise, layout=layout)
    if has_base:
        return xs[0] + nuslerp_pair(t, xs[1] - xs[0], xs[2] - xs[0], **kw)
    return nuslerp_pair(t, xs[0], xs[1], **kw)


def multislerp(xs: Array, weights: Array, *, has_base: bool, normalize_weights: bool = True,
               eps: float = 1e-8) -> Array:
    """Multi-SLERP: barycentric interpolation on the hypersphere (mergekit's ``multislerp``).

    The models (their task vectors when ``has_base``: ``xs[0]`` is the base) are projected to the
    unit sphere, averaged with ``weights`` (normalised to sum 1 when asked), the mean is
    normalised, the points are projected to its tangent space, averaged there, mapped back with
    the exponential map and scaled by the weighted mean of the norms. One model: itself. A mean
    of norm below ``eps``: two models are lerped (an error for more, as in mergekit, is here a
    NaN result).
    """
    base = xs[0] if has_base else None
    ms = xs[1:] if has_base else xs
    if ms.shape[0] == 1:
        return ms[0]
    vs = [(m - base) if has_base else m for m in ms]
    w = weights / jnp.sum(weights) if normalize_weights else weights
    flat = [_acc(v.reshape(-1)) for v in vs]
    norms = [jnp.sqrt(jnp.sum(f * f)) for f in flat]
    units = [f / (n + eps) for f, n in zip(flat, norms, strict=True)]
    mean = _unrolled_sum([u * w[i] for i, u in enumerate(units)])
    mean_norm = jnp.sqrt(jnp.sum(mean * mean))
    degenerate = mean_norm < eps
    mean = mean / jnp.where(degenerate, 1.0, mean_norm)
    tangents = [u - jnp.sum(u * mean) * mean for u in units]
    tangent = _unrolled_sum([tg * w[i] for i, tg in enumerate(tangents)])
    tn = jnp.sqrt(jnp.sum(tangent * tangent)) + eps
    res = mean * jnp.cos(tn) + tangent * (jnp.sin(tn) / tn)
    avg_norm = _unrolled_sum([n * w[i] for i, n in enumerate(norms)])
    res = (res * avg_norm).astype(jnp.float32).reshape(ms.shape[1:])
    if len(vs) == 2:
        fallback = vs[0] * w[0] + vs[1] * w[1]
    else:
        fallback = jnp.full(res.shape, jnp.nan, jnp.float32)
    res = jnp.where(degenerate, fallback, res)
    return res + base if has_base else res


def _softmax_rows(x: Array) -> Array:
    """Softmax along the last axis with the denominator summed in the accumulation dtype (the
    same float32 result on any sharding)."""
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return (e / jnp.sum(_acc(e), axis=-1, keepdims=True)).astype(jnp.float32)


def arcee_fusion(base: Array, model: Array, layout: Layout = None) -> Array:
    """Arcee Fusion: take the model's change only where it matters most.

    Importance ``|model - base| * KL(softmax(model) || softmax(base))`` (the KL per HF row, both
    softmaxes plus 1e-8); entries with importance at least ``median + 1.5 (q3 - q1)`` of the
    tensor's importances (quantiles as ``sorted[int(q (n - 1))]``, ``q`` and the product in
    float32 as mergekit's torch does) take the model's value, the others the base's. mergekit
    estimates the quantiles from 10^6 random samples for larger tensors; here they are exact.
    """
    mb, bb = _to_hf(model, layout), _to_hf(base, layout)
    p = _softmax_rows(mb) + 1e-8
    q = _softmax_rows(bb) + 1e-8
    kl = jnp.sum(_acc(p * jnp.log(p / q)), axis=-1, keepdims=True).astype(jnp.float32)
    imp = _from_hf(jnp.abs(mb - bb) * kl, base, layout)
    n = imp.size
    idx = [int(np.float32(qq) * np.float32(n - 1)) for qq in (0.25, 0.5, 0.75)]
    q1, med, q3 = (order_statistic(imp, i) for i in idx)  # = sort(imp)[i], without the sort
    thr = med + 1.5 * (q3 - q1)
    return base + (model - base) * (imp >= thr).astype(jnp.float32)


def karcher(xs: Array, max_iter: int = 10, tol: float = 1e-5) -> Array:
    """Karcher (Riemannian) mean of the models on the unit sphere, scaled by their mean norm
    (mergekit's ``karcher``, equal weights).

    Models of norm at most ``tol`` are left out of the direction (not of the norm); the mean
    starts at the normalised average of the unit vectors (the first valid one if that is below
    ``tol``) and takes up to ``max_iter`` gradient steps on the sphere, stopping when the step
    is below ``tol``; models within ``tol`` radians of the mean pull nothing. No valid model:
    zeros. ``xs [N, *S]``; one model is itself.
    """
    n = xs.shape[0]
    if n == 1:
        return xs[0]
    flat = [_acc(x.reshape(-1)) for x in xs]
    norms = [jnp.sqrt(jnp.sum(f * f)) for f in flat]
    units = [jnp.where(nm == 0, 0.0, f / jnp.where(nm == 0, 1.0, nm))
             for f, nm in zip(flat, norms, strict=True)]
    valid = jnp.stack([nm > tol for nm in norms])  # [N]
    alphas = valid / jnp.maximum(jnp.sum(valid), 1)
    mean = _unrolled_sum([alphas[i] * units[i] for i in range(n)])
    mean_norm = jnp.sqrt(jnp.sum(mean * mean))
    first = jnp.argmax(valid)
    first_unit = jnp.stack(units)[first]
    mean = jnp.where(mean_norm < tol, first_unit, mean / jnp.where(mean_norm < tol, 1.0,
                                                                   mean_norm))
    done = jnp.asarray(False)
    for _ in range(max_iter):
        terms = []
        for i in range(n):
            dot = jnp.clip(jnp.sum(mean * units[i]), -1.0, 1.0)
            theta = jnp.arccos(dot)
            pull = valid[i] & (theta >= tol)
            coef = jnp.where(pull, alphas[i] * theta / jnp.where(pull, jnp.sin(theta), 1.0), 0.0)
            terms.append(coef * (units[i] - dot * mean))
        tangent = _unrolled_sum(terms)
        tn = jnp.sqrt(jnp.sum(tangent * tangent))
        done = done | (tn < tol)
        step = jnp.cos(tn) * mean + jnp.sin(tn) * (tangent / jnp.where(tn > 0, tn, 1.0))
        un = jnp.sqrt(jnp.sum(step * step))
        step = jnp.where(un > tol, step / jnp.where(un > tol, un, 1.0), step)
        mean = jnp.where(done, mean, step)
    scale = _unrolled_sum([nm / n for nm in norms])
    out = jnp.where(jnp.any(valid), scale * mean, 0.0)
    return out.astype(jnp.float32).reshape(xs.shape[1:])
