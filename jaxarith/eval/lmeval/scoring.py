"""Jitted log-likelihood scoring of token sequences under one model or a logit combination.

lm-eval's ``loglikelihood`` asks for ``log p(continuation | context)`` and whether the
continuation is the greedy one; a multiple-choice document sends one request per choice, all
with the same context. :func:`score_requests` groups requests by their (window-cut) context
into *units*: a context followed by the suffixes of all its requests (:func:`_units`). Units
are packed into rows (:func:`_pack`): a row of T tokens holds as many units as fit, and an
attention mask keeps them apart, so

* a context shared by several requests runs once, and its continuations do not see each other;
* short requests share a row instead of each being padded to a row of its own;
* the output head and the log-softmax run only at the scored positions.

Row lengths T and the number K of scored positions per row are padded to the smallest *score
bucket* (8, 16, 24, 32, 48, 64, 96, ..., ``max_length``: at most 1.5x above 16 tokens), so the
scorer compiles a bounded number of programs whatever the number of distinct lengths.

Each request is scored exactly as lm-eval's HF backend does it: the input is
``(context + continuation)[-(max_length + 1):][:-1]`` and the last ``len(continuation)``
positions are scored (the split into a context and ``continuation[:-1]`` computes the same
causal forward pass). For a combination (proxy tuning, EFT) every member runs the same scheme
and the distribution at every scored position is :func:`jaxarith.decode.loop.combine` of the
members' logits, the same one the decoder samples from.

**Per-member contexts** (``contexts=`` of :func:`score_requests`: e.g. a chat expert reads its
chat template, the base the plain prompt): every member scores the same continuation ids after
its own context. A unit is then keyed by the tuple of its members' contexts; each member gets its
own packed token rows (a unit takes as many slots as its longest member context needs) with the
same scored slots in the same order, so position ``k`` of every member predicts the same target.

Shapes: B packed rows, T their padded length, K scored positions per row, V vocabulary.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxarith import distributed, sharding
from jaxarith.decode.loop import DecodeSpec, combine, member_weights
from jaxarith.errors import ConfigError
from jaxarith.models import transformer
from jaxarith.models.transformer import forward


def length_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Padded lengths: powers of two from ``smallest`` below ``max_length``, then ``max_length``.

    A row of n tokens goes to the first bucket >= n, so at most twice its length is computed
    while the number of programs is ``log2(max_length / smallest) + 2`` at most.
    """
    if max_length < 1:
        raise ConfigError(f"max_length={max_length} must be at least 1")
    out, n = [], smallest
    while n < max_length:
        out.append(n)
        n *= 2
    return (*out, max_length)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``n`` tokens."""
    for b in buckets:
        if n <= b:
            return b
    raise ConfigError(f"a sequence of {n} tokens exceeds the largest bucket {buckets[-1]}")


@functools.partial(jax.jit, static_argnums=0)
def _score_packed(spec: DecodeSpec, params, weights, tokens, positions, unit, branch, at,
                  targets, scored):
    """Per-position log p(target) and greedy flags of one batch of packed rows.

    A row holds several *units* (see :func:`_units`): a context followed by the suffixes
    (``continuation[:-1]``) of every request sharing it. A token attends, causally, to its own
    unit's context and to its own suffix only, never to a sibling suffix or another unit, and
    its position counts from its unit's start (a suffix continues at the context's length), so
    each request is computed exactly as its own ``context + continuation[:-1]`` row. The output
    head and log-softmax run only at the K gathered positions ``at`` (the scored ones).

    Args:
      tokens, positions: G-tuples of [B, T] packed rows (right-padded): G = 1 when every member
        reads the same rows, else one per member (per-member contexts).
      unit: G-tuple of [B, T]: the unit of each token within its row (1, 2, ...; 0 for padding).
      branch: G-tuple of [B, T]: 0 for a unit's context, i >= 1 for the i-th suffix of that unit.
      at: G-tuple of [B, K]: the slots whose next token is scored; targets, scored: [B, K]
        (shared: scored slot k predicts the same target for every member).
    Returns:
      (log p(target) [B, K] float32, 0 where not scored; greedy [B, K] bool).
    """
    dtype = jnp.dtype(spec.dtype)
    t = tokens[0].shape[1]
    slot = jnp.arange(t)
    masks = [((slot[:, None] >= slot[None, :])[None]
              & (u[:, :, None] == u[:, None, :])
              & ((b[:, None, :] == 0) | (b[:, None, :] == b[:, :, None])))
             for u, b in zip(unit, branch, strict=True)]  # G x [B, T, T]
    logits = []
    for i, (m, p) in enumerate(zip(spec.members, params, strict=True)):
        cfg = m.config
        g = i if len(tokens) > 1 else 0
        h, _, _ = forward(p, cfg, tokens[g], attention_mask=masks[g], positions=positions[g],
                       dtype=dtype, hidden_only=True)
        h = jnp.take_along_axis(h, at[g][..., None], axis=1)  # [B, K, D]
        logits.append(transformer.family(cfg).unembed(cfg, p, h).astype(jnp.float32))
    if len(logits) == 1 and spec.members[0].weight == 1.0:
        # one model: log p(target) = z[target] - logsumexp(z), without writing log_softmax's
        # [B, K, V] (twice: combine renormalises); the same up to float32 rounding
        z = logits[0]
        if spec.vocab_limit is not None and spec.vocab_limit < z.shape[-1]:
            z = jnp.where(jnp.arange(z.shape[-1]) < spec.vocab_limit, z, -jnp.inf)
        lp = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0] - \
            jax.nn.logsumexp(z, axis=-1)
    else:
        z = combine(spec, logits, weights)  # [B, K, V] float32 log-probabilities
        lp = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    # per-position values go to the host, which sums them in float64
    return jnp.where(scored > 0, lp, 0.0), jnp.argmax(z, axis=-1) == targets


def compiled_programs() -> int:
    """How many programs the scorer has compiled in this process (for the boundedness test)."""
    return _score_packed._cache_size()


def score_buckets(max_length: int, smallest: int = 8) -> tuple[int, ...]:
    """Padded lengths of the scorer's contexts and continuations: ``smallest``, then steps of
    about 1.5x (8, 16, 24, 32, 48, 64, 96, ...), then ``max_length``.

    Finer than :func:`length_buckets` (at most 1.5x the tokens of the longest row, 2x below
    16): the scorer's rows are short (a context, or a continuation) and padding is most of
    their cost. The number of programs stays ``O(log(max_length))`` per dimension.
    """
    if max_length < 1:
        raise ConfigError(f"max_length={max_length} must be at least 1")
    out, n = [], smallest
    while n < max_length:
        out.append(n)
        n = 2 * n if n < 16 else n * 3 // 2 if n & (n - 1) == 0 else 2 ** n.bit_length()
    return (*out, max_length)


def _rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int,
          contexts: Sequence[Sequence[Sequence[int]]] | None = None):
    """(prefixes, suffix, targets) per request, cut as lm-eval's HF backend does.

    The HF backend scores ``whole = (context + continuation)[-(max_length + 1):]``: input
    ``whole[:-1]``, the last ``len(continuation)`` positions scored. Here that input is split
    into the prefix ``whole[:-len(continuation)]`` (the context, left-truncated; its last token
    predicts the continuation's first) and the suffix ``continuation[:-1]`` (the same for every
    member). ``prefixes`` is a tuple of one prefix (``contexts`` None: the pair's context for
    every member) or of one per member (``contexts[i]``: request i's context per member).
    """
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
        ctxs = (ctx,) if contexts is None else tuple(contexts[i])
        if not all(len(c) for c in ctxs) or not len(cont):
            raise ConfigError(f"request {i}: empty context or continuation tokens")
        if len(cont) > max_length:
            raise ConfigError(f"request {i}: continuation of {len(cont)} tokens exceeds "
                              f"max_length={max_length}")
        n = len(cont)
        prefixes = tuple(tuple((list(c) + list(cont))[-(max_length + 1):][:-n]) for c in ctxs)
        rows.append((prefixes, list(cont)[:-1], list(cont)))
    return rows


MIN_ROW = 256  # packed rows hold at least this many tokens (several short units each)


def _cost(rows, prefix, idx) -> int:
    """Slots a unit takes in a packed row: its tokens (its longest member context and the
    suffixes) or its scored positions, whichever is more (one-token continuations add a scored
    position but no token)."""
    tokens = max(map(len, prefix)) + sum(len(rows[i][1]) for i in idx)
    return max(tokens, sum(len(rows[i][2]) for i in idx))


def _units(rows, cap: int) -> list[tuple[tuple[tuple[int, ...], ...], list[int]]]:
    """Requests grouped by their (cut) contexts: ``(contexts, request indices)`` units, each of
    at most ``cap`` slots (see :func:`_cost`; a context with more continuations than fit
    is repeated in several units). A one-request unit is that request's own row."""
    groups: dict[tuple[tuple[int, ...], ...], list[int]] = {}
    for i, (prefix, _, _) in enumerate(rows):
        groups.setdefault(prefix, []).append(i)
    units = []
    for prefix, idx in groups.items():
        cur: list[int] = []
        for i in idx:
            if cur and _cost(rows, prefix, [*cur, i]) > cap:
                units.append((prefix, cur))
                cur = []
            cur.append(i)
        units.append((prefix, cur))
    return units


def _pack(rows, units, batch_size: int, buckets: Sequence[int], min_row: int = MIN_ROW):
    """Calls of the scorer: ``(T, K, rows)``, ``batch_size`` or fewer packed rows of T slots
    and K scored positions (buckets), each row a list of units.

    A unit goes to rows of length T = the smallest bucket holding ``max(min_row, its cost)``;
    within a length, units are packed best-fit decreasing (each into the fullest row it fits).
    Rows are ordered fullest first and taken ``batch_size`` at a time.
    """
    floor = bucket_for(min(min_row, buckets[-1]), buckets)
    by_length: dict[int, list[int]] = {}
    costs = [_cost(rows, *u) for u in units]
    for j, c in enumerate(costs):
        by_length.setdefault(max(floor, bucket_for(c, buckets)), []).append(j)
    for t in sorted(by_length, reverse=True):
        packed: list[list[int]] = []  # rows of unit indices
        free: dict[int, list[int]] = {}  # free slots -> rows with that many
        for j in sorted(by_length[t], key=lambda j: -costs[j]):
            c = costs[j]
            fit = next((f for f in range(c, t + 1) if free.get(f)), None)
            if fit is None:
                packed.append([])
                r, fit = len(packed) - 1, t
            else:
                r = free[fit].pop()
            packed[r].append(j)
            free.setdefault(fit - c, []).append(r)
        packed.sort(key=lambda r: -sum(costs[j] for j in r))
        for start in range(0, len(packed), batch_size):
            call = [[units[j] for j in r] for r in packed[start:start + batch_size]]
            k = max(sum(len(rows[i][2]) for _, idx in r for i in idx) for r in call)
            yield t, bucket_for(k, buckets), call


def _calls(rows, max_length: int, batch_size: int, buckets: Sequence[int],
           min_row: int = MIN_ROW):
    """The scorer's calls for ``rows`` (see :func:`_pack`): ``(T, K, packed rows)``.

    A unit (one context and its continuations) fills at most one row of ``max_length`` slots,
    or of ``min_row`` when the window is shorter (positions never exceed the window).
    """
    cap = max(max_length, min_row)
    buckets = tuple(buckets) if buckets[-1] >= cap else (*buckets, cap)
    return _pack(rows, _units(rows, cap), batch_size, buckets, min_row)


def score_requests(
    spec: DecodeSpec,
    params: Sequence[dict],
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_length: int,
    batch_size: int,
    buckets: Sequence[int],
    mesh: jax.sharding.Mesh | None = None,
    pad_token: int = 0,
    on_batch=None,
    min_row: int = MIN_ROW,
    contexts: Sequence[Sequence[Sequence[int]]] | None = None,
) -> list[tuple[float, bool]]:
    """``(log p(cont | ctx), is_greedy)`` per ``(ctx, cont)`` token pair, in the given order.

    Requests with the same (truncated) context share one run of it, and short requests share
    rows (see :func:`_score_packed`).

    Args:
      spec: the members (their configs and weights) and compute dtype; its sampler and lengths
        are unused here.
      params: one parameter tree per member.
      pairs: (context ids, continuation ids), both non-empty.
      max_length: the model window; longer inputs lose tokens on the left (as in lm-eval).
      batch_size: packed rows per call (rounded up to the mesh's data-parallel size; a last
        call with fewer rows is not padded to it).
      buckets: padded lengths of rows and of their scored positions (see
        :func:`score_buckets`); the last must be >= ``max_length``.
      mesh: score sharded on this mesh (params already placed on it). A mesh over several
        processes' devices makes this a collective: every process calls it with the same
        arguments (see :mod:`jaxarith.eval.lmeval.multihost`) and gets every result.
      on_batch: called with the number of requests done after each batch (progress).
      min_row: the shortest packed row (more short requests per row: larger matmuls).
      contexts: per request, one context (ids) per member, replacing the pair's context: each
        member scores the pair's continuation after its own context (e.g. its own chat
        template). None: every member reads the pair's context.
    """
    if contexts is not None:
        if len(contexts) != len(pairs):
            raise ConfigError(f"{len(contexts)} per-member contexts for {len(pairs)} requests")
        bad = [i for i, c in enumerate(contexts) if len(c) != len(spec.members)]
        if bad:
            raise ConfigError(f"request {bad[0]}: {len(contexts[bad[0]])} contexts for "
                              f"{len(spec.members)} members")
    rows = _rows(pairs, max_length, contexts)
    dp = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = -(-batch_size // dp) * dp
    weights = member_weights(spec)
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    gather = mesh is not None and jax.process_count() > 1  # a collective call: see mesh

    def place(a):
        if isinstance(a, tuple):
            return tuple(map(place, a))
        if mesh is None:
            return a
        return jax.device_put(a, sharding.named_sharding(mesh, ("batch", "seq"), a.shape))

    with ctx:
        for t, k, packed in _calls(rows, max_length, batch_size, buckets, min_row):
            # the last call of a length may hold fewer rows: padded to a multiple of the
            # data-parallel size, not to batch_size (at most one extra program per length)
            n_rows = -(-len(packed) // dp) * dp
            *arrays, where = _packed_arrays(rows, packed, n_rows, t, k, pad_token)
            lp, greedy = _score_packed(spec, tuple(params), weights, *map(place, arrays))
            if gather:  # rows sharded over other processes' devices: every process gets all
                lp, greedy = distributed.to_host(lp), distributed.to_host(greedy)
            lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
            for i, (r, k, n) in where.items():
                out[i] = (float(lp[r, k:k + n].sum()), bool(greedy[r, k:k + n].all()))
            if on_batch is not None:
                on_batch(len(where))
    return out  # type: ignore[return-value]


def _packed_arrays(rows, packed, n_rows: int, t: int, k: int, pad_token: int):
    """tokens, positions, unit, branch, at (G-tuples, one per context set: see
    :func:`_score_packed`), targets, scored of :func:`_score_packed` for the ``packed`` rows
    (plus empty ones up to ``n_rows``), and ``{request: (row, first scored slot, count)}``.

    Every member's row holds the same units in the same order; a member's slots follow its own
    context lengths, its scored slots (``at``) are listed in the same order as the shared
    ``targets``."""
    n_sets = len(rows[0][0]) if rows else 1
    tokens = np.full((n_sets, n_rows, t), pad_token, np.int32)
    positions, unit, branch = (np.zeros((n_sets, n_rows, t), np.int32) for _ in range(3))
    at = np.zeros((n_sets, n_rows, k), np.int32)
    targets = np.zeros((n_rows, k), np.int32)
    scored = np.zeros((n_rows, k), np.int32)
    where = {}
    for g in range(n_sets):
        for r, units in enumerate(packed):
            slot = j = 0  # next free token slot, next scored slot
            for u, (prefixes, idx) in enumerate(units, start=1):
                prefix = prefixes[g]
                p = len(prefix)
                tokens[g, r, slot:slot + p], positions[g, r, slot:slot + p] = prefix, np.arange(p)
                unit[g, r, slot:slot + p] = u
                last, slot = slot + p - 1, slot + p  # the context's last token predicts target 0
                for b, i in enumerate(idx, start=1):
                    _, suffix, target = rows[i]
                    n = len(suffix)
                    tokens[g, r, slot:slot + n] = suffix
                    positions[g, r, slot:slot + n] = p + np.arange(n)
                    unit[g, r, slot:slot + n], branch[g, r, slot:slot + n] = u, b
                    at[g, r, j] = last
                    at[g, r, j + 1:j + 1 + n] = np.arange(slot, slot + n)
                    targets[r, j:j + n + 1], scored[r, j:j + n + 1] = target, 1
                    where[i] = (r, j, n + 1)
                    slot, j = slot + n, j + n + 1
    return (tuple(tokens), tuple(positions), tuple(unit), tuple(branch), tuple(at), targets,
            scored, where)
