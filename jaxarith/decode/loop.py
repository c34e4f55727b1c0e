"""Jitted generation with a static-length KV cache, for one model or a weighted product of several.

One compiled program does everything: prefill every member model on its own (left-padded) prompt,
then a ``lax.while_loop`` that at each step combines the members' next-token log-probabilities

    log p = log_softmax( sum_i w_i * log_softmax(z_i) )          (float32)

samples from it (greedy / temperature / top-k / top-p, applied *after* combining), and feeds the
token to every member's cache. One member with weight 1 is plain generation; proxy tuning and
emulated fine-tuning are weight choices (see :mod:`jaxarith.decode.combine`; speculative decoding
of a combination is :mod:`jaxarith.decode.speculative`).

A :class:`DecodeSpec` is a frozen, hashable description (configs, weights, sampler, lengths) and
is the static argument of the jitted function: calls with the same spec and shapes do not
recompile. Prompt lengths are padded up to a multiple of ``DecodeSpec.prompt_bucket`` so that
prompts of similar length share one program too.

Streaming: an ``on_tokens`` host callback receives the tokens in chunks (the first token at once,
then chunks of about :data:`STREAM_SECONDS` of decoding each). The host drives the chunks, one
compiled chunk program for every width, and queues chunk k + 1 before it reads chunk k, so the
device never waits for the host's printing and the tokens equal the one-program path's.

Shapes (letters as in :mod:`jaxarith.models`): B batch, P padded prompt length, S cache length,
V vocabulary, R new tokens (``max_new_tokens``), M models combined.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxarith import sharding
from jaxarith.decode.sampling import Greedy, Sampler
from jaxarith.distributed import to_host
from jaxarith.errors import ConfigError
from jaxarith.models.family import DType, ModelConfig, parse_enum
from jaxarith.models.layers import KVCache
from jaxarith.models.transformer import (
    CACHE_AXES,
    check_token_ids,
    forward,
    init_cache,
    stack_cache,
    unstack_cache,
    unstack_layers,
)

TokenCallback = Callable[[int, np.ndarray, np.ndarray], None]
"""Called on the host as tokens arrive: ``fn(start, tokens, valid)``; ``tokens`` [B, C] int32 are
output positions ``start .. start + C - 1`` (consecutive calls continue where the last one
ended) and ``valid`` [B, C] bool is False where a row emitted nothing (finished, or a budget
reached)."""

STREAM_SECONDS = 0.1
"""Streaming granularity: after the first token (sent alone, at once), chunks are sized to take
about this long at the measured speed (one host round trip per chunk, not per token)."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of a combination: its config, its weight and a role name for messages.

    The weight is not part of the compilation key (``compare=False``): the compiled loop takes
    the weights as a traced argument, so sweeping ``alpha`` / ``beta`` reuses one program.
    """

    config: ModelConfig
    weight: float = dataclasses.field(default=1.0, compare=False)
    role: str = dataclasses.field(default="model", compare=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeSpec:
    """What to generate and how (static: it keys the compilation cache).

    Attributes:
      members: the models combined at every step. Their embedding tables may be padded to
        different sizes (one tokenizer): then ``vocab_limit`` (``len(tokenizer)``) is required
        and the combination runs over the rows below it (jaxarith.io.vocab).
      max_new_tokens: the loop's length; a row may stop earlier (stop token or its own limit).
      sampler: applied to the combined log-probabilities.
      stop_tokens: a row stops after emitting one of these; later positions hold ``pad_token``.
      pad_token: fills left padding and the positions after a row stopped.
      vocab_limit: ids >= this (embedding rows padded beyond the tokenizer) get probability 0.
      dtype: compute dtype of the forward passes (the cache uses it too).
      prompt_bucket: the padded prompt length is rounded up to a multiple of this.
      cache_len: a fixed cache length (default: padded prompt + ``max_new_tokens``); a prompt
        that does not fit is an error.
    """

    members: tuple[Member, ...]
    max_new_tokens: int
    sampler: Sampler = Greedy()
    stop_tokens: tuple[int, ...] = ()
    pad_token: int = 0
    vocab_limit: int | None = None
    dtype: DType = DType.FLOAT32
    prompt_bucket: int = 8
    cache_len: int | None = None

    def __post_init__(self):
        # a plain "float32" equals (and hashes as) DType.FLOAT32: validated, not rewritten
        parse_enum(DType, self.dtype, "dtype")
        if not self.members:
            raise ConfigError("a decoder needs at least one model")
        vocabs = {m.config.vocab_size for m in self.members}
        if len(vocabs) != 1 and self.vocab_limit is None:
            roles = ", ".join(f"{m.role}={m.config.vocab_size}" for m in self.members)
            raise ConfigError(f"vocab sizes differ ({roles}): models whose embedding tables are "
                              f"padded differently are combined over the tokenizer's rows; give "
                              f"vocab_limit=len(tokenizer)")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.prompt_bucket < 1:
            raise ConfigError(f"prompt_bucket={self.prompt_bucket} must be >= 1")
        if self.vocab_limit is not None and not 0 < self.vocab_limit <= self.vocab_size:
            raise ConfigError(f"vocab_limit={self.vocab_limit} must be in [1, vocab_size="
                              f"{self.vocab_size}]: a tokenizer larger than the embedding "
                              f"cannot be decoded")

    @property
    def vocab_size(self) -> int:
        """The width of the combined distribution: the smallest member's table (members padded
        to larger tables are cut to it; their extra rows are beyond ``vocab_limit``)."""
        return min(m.config.vocab_size for m in self.members)



@dataclasses.dataclass(frozen=True)
class Generation:
    """What :func:`generate` returns (numpy arrays on the host).

    Attributes:
      tokens: [B, R] generated ids; ``pad_token`` after a row's end.
      lengths: [B] tokens generated per row, including the stop token.
      logprobs: [B, R] log p(token) under the combined distribution before temperature /
        top-k / top-p (0 after a row's end).
      steps: loop iterations run (the loop exits when every row has stopped).
      seconds: wall time of the compiled program (compilation excluded).
      compile_seconds: tracing + compilation time of this call (~0 when cached).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    logprobs: np.ndarray
    steps: int
    seconds: float = 0.0
    compile_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return float(np.sum(self.lengths)) / max(self.seconds, 1e-9)


def left_pad(prompts: Sequence[Sequence[int]], pad: int = 0,
             bucket: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Batch token lists, left-padded to the longest rounded up to ``bucket``.

    Returns:
      (tokens [B, P], mask [B, P]) int32, mask 1 on real tokens.
    """
    if not len(prompts):
        raise ConfigError("no prompts given")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ConfigError(f"every prompt must have at least one token; prompt(s) {empty} are "
                          f"empty")
    n = -(-max(len(p) for p in prompts) // bucket) * bucket
    tokens = np.full((len(prompts), n), pad, np.int32)
    mask = np.zeros((len(prompts), n), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, n - len(p):] = p
        mask[i, n - len(p):] = 1
    return tokens, mask


def _is_token_list(x) -> bool:
    return all(isinstance(t, int | np.integer) for t in x)


def prepare_prompts(dec: DecodeSpec, prompts,
                    extra: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Left-pad each member's prompts and check they fit the cache and the model's context.

    Args:
      prompts: one batch of token lists shared by every member, or one batch per member.
      extra: cache slots needed beyond ``max_new_tokens`` (speculative drafts).
    Returns:
      one (tokens [B, P], mask [B, P]) pair per member.
    """
    shared = all(_is_token_list(p) for p in prompts)
    batches = [prompts] * len(dec.members) if shared else list(prompts)
    if len(batches) != len(dec.members):
        raise ConfigError(f"{len(batches)} prompt batches for {len(dec.members)} models")
    padded = []
    for member, batch in zip(dec.members, batches, strict=True):
        tokens, mask = left_pad(batch, dec.pad_token, dec.prompt_bucket)
        check_token_ids(tokens, member.config.vocab_size, f"{member.role} prompt")
        longest = int(mask.sum(1).max())
        need = longest + dec.max_new_tokens + extra
        if need > member.config.context_length:
            raise ConfigError(
                f"{member.role}: prompt of {longest} tokens + max_new_tokens="
                f"{dec.max_new_tokens}{f' + {extra} draft slots' if extra else ''} exceeds the "
                f"model's context of {member.config.context_length}")
        if dec.cache_len is not None and tokens.shape[1] + dec.max_new_tokens + extra > \
                dec.cache_len:
            raise ConfigError(
                f"{member.role}: prompt of {longest} tokens (padded to {tokens.shape[1]}) + "
                f"max_new_tokens={dec.max_new_tokens}"
                f"{f' + {extra} draft slots' if extra else ''} does not fit the cache of "
                f"cache_len={dec.cache_len} slots")
        padded.append((tokens, mask))
    if len({t.shape[0] for t, _ in padded}) != 1:
        raise ConfigError("every model needs the same number of prompts: got "
                          + ", ".join(f"{m.role}={t.shape[0]}"
                                      for m, (t, _) in zip(dec.members, padded, strict=True)))
    return padded


def member_weights(dec: DecodeSpec) -> np.ndarray:
    """The members' weights [M] float32 (a traced argument of the compiled loops)."""
    return np.asarray([m.weight for m in dec.members], np.float32)


def combine(dec: DecodeSpec, logits: Sequence[jax.Array],
            weights: jax.Array | None = None) -> jax.Array:
    """Combined, renormalised log-probabilities [..., V] from each member's logits [..., V].

    ``log_softmax(sum_i w_i * log_softmax(z_i))`` in float32; ids >= ``dec.vocab_limit`` are -inf.
    Members with larger (padded) tables are cut to ``dec.vocab_size`` columns first.

    Args:
      weights: [M] weights; default the members' (code under jit must pass them explicitly,
        since the weights are not part of the static decoder).
    """
    weights = member_weights(dec) if weights is None else weights
    total = 0.0
    for i, z in enumerate(logits):
        z = z[..., :dec.vocab_size].astype(jnp.float32)
        if dec.vocab_limit is not None and dec.vocab_limit < z.shape[-1]:
            z = jnp.where(jnp.arange(z.shape[-1]) < dec.vocab_limit, z, -jnp.inf)
        lp = jax.nn.log_softmax(z, axis=-1)
        # keep -inf entries at -inf whatever the weight's sign (0 * -inf would be nan)
        total = total + jnp.where(jnp.isneginf(lp), -jnp.inf, weights[i] * lp)
    return jax.nn.log_softmax(total, axis=-1)


def constrain_cache(cache: KVCache) -> KVCache:
    """Shard a cache by the logical rules (batch, kv heads ...) when a mesh is set."""
    if isinstance(cache.k, tuple):  # per layer (unstack_cache): the axes without "layers"
        per_layer = CACHE_AXES.k[1:]
        return cache._replace(
            k=tuple(sharding.constrain(k, per_layer) for k in cache.k),
            v=tuple(sharding.constrain(v, per_layer) for v in cache.v),
            valid=sharding.constrain(cache.valid, CACHE_AXES.valid))
    return jax.tree.map(sharding.constrain, cache, CACHE_AXES,
                        is_leaf=lambda x: isinstance(x, jax.Array))


def prefill(dec: DecodeSpec, params, prompts, extra: int = 0):
    """Each member's cache after its prompt, and its next-token logits [B, V]."""
    caches, last = [], []
    for member, p, (tokens, mask) in zip(dec.members, params, prompts, strict=True):
        cfg = member.config
        length = dec.cache_len or tokens.shape[1] + dec.max_new_tokens + extra
        cache = constrain_cache(init_cache(cfg, tokens.shape[0], length, jnp.dtype(dec.dtype)))
        logits, cache, _ = forward(p, cfg, tokens, attention_mask=mask, cache=cache,
                                dtype=jnp.dtype(dec.dtype))
        caches.append(constrain_cache(cache))
        last.append(logits[:, -1])
    return tuple(caches), tuple(last)


def feed(member: Member, dtype: DType | str, params, cache: KVCache, tokens: jax.Array,
         mask: jax.Array | None = None) -> tuple[KVCache, jax.Array]:
    """Feed tokens [B, T] to one member's cache; returns (cache, logits [B, T, V])."""
    mask = jnp.ones(tokens.shape, bool) if mask is None else mask
    logits, cache, _ = forward(params, member.config, tokens, attention_mask=mask, cache=cache,
                            dtype=jnp.dtype(dtype))
    return constrain_cache(cache), logits


def step(dec: DecodeSpec, params, caches, tokens, mask):
    """Feed tokens [B, T] to every member; returns (caches, logits [B, T, V] per member)."""
    out = [feed(m, dec.dtype, p, c, tokens, mask)
           for m, p, c in zip(dec.members, params, caches, strict=True)]
    return tuple(c for c, _ in out), tuple(lg for _, lg in out)


def _decode_body(dec: DecodeSpec, params, weights, limits):
    """One decode step over the loop state ``(i, out, out_lp, done, caches, last, key)``."""
    stops = jnp.asarray(dec.stop_tokens or (-1,), jnp.int32)

    def body(state):
        i, out, out_lp, done, caches, last, key = state
        logp = combine(dec, last, weights)
        tok = dec.sampler.get_next_tokens(logp, jax.random.fold_in(key, i))
        lp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
        tok = jnp.where(done, dec.pad_token, tok)
        out = out.at[:, i].set(tok)
        out_lp = out_lp.at[:, i].set(jnp.where(done, 0.0, lp))
        # a finished row feeds a masked pad: its cache slot stays invalid
        caches, logits = step(dec, params, caches, tok[:, None], (~done)[:, None])
        done = done | jnp.isin(tok, stops) | (i + 1 >= limits)
        return i + 1, out, out_lp, done, caches, tuple(z[:, -1] for z in logits), key

    return body


def _decode_start(dec: DecodeSpec, params, prompts, key, limits):
    """The loop state after the prefill."""
    b, n = prompts[0][0].shape[0], dec.max_new_tokens
    caches, last = prefill(dec, params, prompts)
    return (jnp.zeros((), jnp.int32), jnp.full((b, n), dec.pad_token, jnp.int32),
            jnp.zeros((b, n), jnp.float32), limits <= 0, caches, last, key)


def _decode_until(dec: DecodeSpec, params, weights, limits, state, until):
    """Run the loop until ``until`` steps (or every row stopped)."""
    def cond(state):
        i, _, _, done, *_ = state
        return (i < until) & ~jnp.all(done)

    params = tuple(unstack_layers(p) for p in params)
    return while_in_place(cond, _decode_body(dec, params, weights, limits), state)


def while_in_place(cond, body, state):
    """``lax.while_loop`` over a token-loop state whose slot 4 holds the members' caches: the
    loop sees per-layer caches, updated in place, and the result has them stacked again.

    With the members' params unstacked too (``transformer.unstack_layers``, done by the caller
    before building ``body``), the loop reads every layer's weights and cache in place: XLA's
    CPU backend otherwise copies each layer out of the stacked arrays at every token.
    """
    state = (*state[:4], tuple(unstack_cache(c) for c in state[4]), *state[5:])
    state = jax.lax.while_loop(cond, body, state)
    return (*state[:4], tuple(stack_cache(c) for c in state[4]), *state[5:])


@functools.partial(jax.jit, static_argnums=0)
def _generate(dec: DecodeSpec, params, weights, prompts, key, limits):
    state = _decode_start(dec, params, prompts, key, limits)
    i, out, out_lp, *_ = _decode_until(dec, params, weights, limits, state, dec.max_new_tokens)
    return out, out_lp, i


@functools.partial(jax.jit, static_argnums=0)
def _generate_start(dec: DecodeSpec, params, weights, prompts, key, limits):
    """Prefill and the first step: the state after one token (streaming's first chunk)."""
    state = _decode_start(dec, params, prompts, key, limits)
    return _decode_until(dec, params, weights, limits, state, 1)


_generate_chunk = jax.jit(_decode_until, static_argnums=0, donate_argnums=4)


def _viewed(fn, donate: int | None):
    """``fn`` (jitted, first argument static) returning ``(state, view)``, where ``view`` holds
    copies of the state's ``(position, tokens, done)`` in buffers of their own: the host reads a
    chunk's view while the state has already been donated to the next chunk.

    ``donate``: the index (static argument included) of the donated state, or None.
    """
    key = (fn, donate)
    if key not in _VIEWED:
        def run(spec, *args):
            state = fn(spec, *args)
            return state, (state[0], state[1], state[3])

        _VIEWED[key] = jax.jit(run, static_argnums=0,
                               donate_argnums=() if donate is None else donate)
    return _VIEWED[key]


_VIEWED: dict = {}


def stream_chunks(dec: DecodeSpec, start, start_args, chunk, chunk_args, limits: np.ndarray,
                  on_tokens: TokenCallback, mesh):
    """Run a decode loop in host-driven chunks, handing each chunk's tokens to ``on_tokens``.

    ``start(*start_args)`` (jitted, first argument static) returns the loop state after the
    prefill; ``chunk(*chunk_args, state, until)`` (jitted, first argument static, state donated)
    advances it to ``until`` positions or until every row stopped. The state starts with
    ``(position, tokens [B, R'], logprobs, done [B], ...)``; ``start`` already holds the first
    token (it shows at once).

    Pipelined: chunk k + 1 is dispatched before the host reads chunk k's tokens (JAX dispatches
    asynchronously), so the device never waits for the host's printing; the loop runs on the
    device with no host callback inside (a callback in the loop costs more than a tiny model's
    whole step). Chunks after the first are sized to take :data:`STREAM_SECONDS` at the speed
    measured so far; ``until`` is a traced argument, so every chunk width (the last one too)
    runs the same compiled program. Stops (all rows done, or ``max_new_tokens``) are checked
    per chunk: a chunk dispatched after every row stopped does nothing. The tokens equal those
    of the one-program path.

    Returns:
      (final state, run seconds, compile seconds).
    """
    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    n = dec.max_new_tokens
    start_v = _viewed(start, None)
    chunk_v = _viewed(chunk, len(chunk_args))
    with ctx:
        start_key = _compile_key(start_v, start_args, mesh)
        start_c, compile_s = compiled(start_v, start_args, mesh, start_key)
        t_run = time.perf_counter()
        state, view = start_c(*start_args[1:])
        # the chunk program (its arguments' types follow from the start program's): taken from
        # the cache without waiting; compiled (first call) only after the first token is shown
        chunk_key = (start_key, chunk_v)
        chunk_c = _COMPILED.get(chunk_key)
        pending = collections.deque([view])  # dispatched chunks whose tokens are not yet shown
        planned, sent, shown, stopped = 1, 0, 0, False
        # the chunk queued behind the first token: sized by the speed of this program's last
        # call in this process (the first call has no measurement yet)
        width, t_ready = min(_RATES.get(start_key, FIRST_CHUNK), MAX_CHUNK or n), t_run
        while True:
            if chunk_c is not None and not stopped and planned < n and len(pending) < 2:
                planned = min(n, planned + width)
                state, view = chunk_c(*chunk_args[1:], state, np.int32(planned))
                pending.append(view)
            if not pending:
                break
            pos, out, done = jax.device_get(pending.popleft())
            now = time.perf_counter()
            pos = min(int(pos), n)
            if pos > sent:
                # a row's emitted positions are a prefix: its length so far says which are valid
                out = np.asarray(out)[:, :n]
                lengths = _lengths(dec, out, limits, pos)
                valid = np.arange(sent, pos)[None, :] < lengths[:, None]
                on_tokens(sent, np.where(valid, out[:, sent:pos], dec.pad_token), valid)
                # the device ran this chunk from the previous one's end (it was queued)
                width = max(1, int((pos - shown) / max(now - t_ready, 1e-6) * STREAM_SECONDS))
                width = min(width, MAX_CHUNK or width)
                if shown > 0:  # a decode chunk (not the prefill-heavy start): remember its speed
                    if len(_RATES) > _COMPILED_MAX:
                        _RATES.clear()
                    _RATES[start_key] = width
                sent = shown = pos
            t_ready = now
            stopped = stopped or pos >= n or bool(np.all(done))
            if chunk_c is None and not stopped:
                t0 = time.perf_counter()
                chunk_c, c = compiled(chunk_v, (*chunk_args, state, np.int32(1)), mesh,
                                      chunk_key)
                compile_s += c
                t_ready += time.perf_counter() - t0
                t_run += time.perf_counter() - t0
        jax.block_until_ready(state)
        seconds = time.perf_counter() - t_run
    return state, seconds, compile_s


FIRST_CHUNK = 4
"""Streaming: the width of the chunk queued behind the first token when no speed has been
measured yet for this program; later chunks are sized by :data:`STREAM_SECONDS`."""
MAX_CHUNK: int | None = None
"""Streaming: an upper bound on a chunk's tokens (None: no bound; tests set it to place chunk
boundaries)."""
_RATES: dict = {}  # a start program's cache key -> chunk width measured on its last call


def row_limits(dec: DecodeSpec, batch: int,
               max_new_tokens: Sequence[int] | int | None) -> np.ndarray:
    """Per-row token budgets [B] (each <= ``dec.max_new_tokens``)."""
    if max_new_tokens is None:
        return np.full((batch,), dec.max_new_tokens, np.int32)
    limits = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (batch,)).copy()
    if (limits < 0).any() or (limits > dec.max_new_tokens).any():
        raise ConfigError(f"per-row max_new_tokens {limits.tolist()} must be in "
                          f"[0, DecodeSpec.max_new_tokens={dec.max_new_tokens}]")
    return limits


def _lengths(dec: DecodeSpec, tokens: np.ndarray, limits: np.ndarray, steps: int) -> np.ndarray:
    """Tokens emitted per row [B]: through its first stop token, within its budget and the
    steps run."""
    n = tokens.shape[1]
    if dec.stop_tokens:
        # a comparison per stop id: np.isin costs more than a tiny model's step here
        stops = functools.reduce(np.logical_or, [tokens == s for s in dec.stop_tokens])
        lengths = np.where(stops.any(1), stops.argmax(1) + 1, n)
    else:
        lengths = np.full(tokens.shape[0], n)
    return np.minimum(np.minimum(lengths, limits), steps)


def finish(dec: DecodeSpec, tokens, logprobs, limits: np.ndarray,
           steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The post-processing every generate path shares, on the host.

    Args:
      tokens, logprobs: the loop's outputs [B, R] (device or numpy arrays).
      limits: per-row budgets [B]; steps: positions the loop produced.
    Returns:
      (tokens [B, R], lengths [B], logprobs [B, R]) numpy: a row's length runs through its first
      stop token, within its budget and the steps run; later positions hold ``pad_token`` and
      log-probability 0.
    """
    if isinstance(tokens, jax.Array) and not tokens.is_fully_addressable:
        tokens, logprobs = to_host(tokens), to_host(logprobs)
    tokens, logprobs = np.array(tokens), np.array(logprobs)
    lengths = _lengths(dec, tokens, limits, steps)
    after = np.arange(tokens.shape[1])[None, :] >= lengths[:, None]
    tokens[after] = dec.pad_token
    logprobs[after] = 0.0
    return tokens, lengths, logprobs


_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_MAX = 32


def _compile_key(fn, lower_args, mesh):
    """What a compiled program depends on: the function, the static spec, the arguments'
    structure, types (shape, dtype, weak type) and shardings, the mesh, and the global JAX
    settings that change lowering (x64, default matmul precision)."""
    leaves, tree = jax.tree.flatten(lower_args[1:])
    return (fn, lower_args[0], tree, mesh, jax.config.jax_enable_x64,
            jax.config.jax_default_matmul_precision,
            tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves))


def compiled(fn, lower_args, mesh, key=None):
    """The compiled program of ``fn`` for ``lower_args`` (all arguments, the static first one
    included), and the seconds spent compiling it (0 when cached).

    ``key``: the cache key when known (default :func:`_compile_key`).

    Kept in a small cache of compiled programs: ``fn.lower(...).compile()`` on every call
    would cost a lowering-cache lookup and a slow first call of a fresh executable wrapper
    (together ~1 ms, as long as a tiny model's whole generation).
    """
    key = _compile_key(fn, lower_args, mesh) if key is None else key
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    exe = fn.lower(*lower_args).compile()
    _COMPILED[key] = exe
    if len(_COMPILED) > _COMPILED_MAX:
        _COMPILED.popitem(last=False)
    return exe, time.perf_counter() - t0


def compile_and_run(fn, lower_args, args, mesh):
    """Compile ``fn`` for ``lower_args`` (all arguments, static ones included; compiled
    programs are cached) and run it on ``args`` (the non-static ones). Returns (outputs, run s,
    compile s).

    With ``mesh``, prompt arrays are placed batch-sharded and the program runs under
    ``jax.set_mesh`` so activations and caches follow the logical rules.
    """
    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with ctx:
        exe, compile_s = compiled(fn, lower_args, mesh)
        t1 = time.perf_counter()
        out = jax.block_until_ready(exe(*args))
        t2 = time.perf_counter()
    return out, t2 - t1, compile_s


def place_prompts(padded, mesh):
    """Prompt arrays on the mesh, sharded over the batch (left as numpy without a mesh)."""
    if mesh is None:
        return tuple(padded)
    return tuple(tuple(jax.device_put(a, sharding.named_sharding(mesh, ("batch", "seq"), a.shape))
                       for a in pair) for pair in padded)


def generate(
    dec: DecodeSpec,
    params: Sequence[dict],
    prompts: Sequence[Sequence[Sequence[int]]] | Sequence[Sequence[int]],
    *,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    max_new_tokens: Sequence[int] | int | None = None,
    on_tokens: TokenCallback | None = None,
) -> Generation:
    """Generate for a batch of prompts with every member of ``dec`` combined at each step.

    Args:
      dec: the spec (models' configs, weights, sampler, lengths).
      params: one parameter tree per member, in ``dec.members`` order.
      prompts: token lists, either one batch shared by all members, or one batch per member
        (each model may get its own prompt template; the batch sizes must agree). Ids outside
        a model's vocabulary are an error.
      seed: PRNG seed (sampling only).
      mesh: run sharded on this mesh (params should already be placed on it).
      max_new_tokens: optional per-row budgets (<= ``dec.max_new_tokens``), without recompiling.
      on_tokens: host callback ``fn(start, tokens [B, C], valid [B, C])`` receiving the tokens
        in chunks as they are produced (streaming; see :data:`TokenCallback`). Part of the
        compilation key: pass the same function to reuse the program.
    Returns:
      a :class:`Generation`.
    """
    if len(params) != len(dec.members):
        raise ConfigError(f"{len(params)} parameter trees for {len(dec.members)} models")
    padded = prepare_prompts(dec, prompts)
    limits = row_limits(dec, padded[0][0].shape[0], max_new_tokens)
    dynamic = (tuple(params), member_weights(dec), place_prompts(padded, mesh),
               jax.random.key(seed), limits)
    if on_tokens is None:
        (out, lps, steps), seconds, compile_s = compile_and_run(
            _generate, (dec, *dynamic), dynamic, mesh)
    else:
        params_, weights, prompts_, key, limits_ = dynamic
        state, seconds, compile_s = stream_chunks(
            dec, _generate_start, (dec, params_, weights, prompts_, key, limits_),
            _generate_chunk, (dec, params_, weights, limits_), limits, on_tokens, mesh)
        steps, out, lps = state[:3]
    tokens, lengths, lps = finish(dec, out, lps, limits, int(steps))
    return Generation(tokens, lengths, lps, int(steps), seconds, compile_s)
