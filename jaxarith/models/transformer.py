"""The decoder driver shared by every family: embed, scan over stacked blocks, unembed.

Models are pure functions of a canonical parameter tree (a nested dict of arrays whose layout each
family defines, see :mod:`jaxarith.models.family`). :class:`CausalLM` is the Flax NNX face of the
same tree: its ``nnx.state(model, nnx.Param).to_pure_dict()`` *is* the canonical tree, and every
Param carries its logical axes as metadata. Shape letters: see :mod:`jaxarith.models`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxarith import sharding
from jaxarith.errors import ConfigError
from jaxarith.models import kernels
from jaxarith.models import remat as remat_lib
from jaxarith.models.family import BlockContext, Family, Inputs, ModelConfig, ParamSpec
from jaxarith.models.fused_ce import linear_cross_entropy
from jaxarith.models.layers import (
    KVCache,
    attend,
    attend_causal,
    key_distance,
    update_cache_layer,
    windowed,
)
from jaxarith.models.layers import attention_mask as make_attention_mask
from jaxarith.models.registry import family as _family

Params = dict


class ForwardOutput(NamedTuple):
    """What :func:`forward` returns."""

    logits: jax.Array  # [B, T, V] float32 (with hidden_only: the last block's output [B, T, D])
    cache: KVCache | None  # the updated cache, when one was given
    aux: Any  # the blocks' extra outputs stacked over layers (Mixtral: router logits), or None


class UnstackedLayers(tuple):
    """``params["layers"]`` as a tuple of per-layer trees (:func:`unstack_layers`), which
    :func:`forward` runs as a Python loop instead of a scan (for decoding); a pytree node."""


jax.tree_util.register_pytree_node(UnstackedLayers, lambda t: (tuple(t), None),
                                   lambda _, children: UnstackedLayers(children))


def family(cfg: ModelConfig) -> Family:
    """The :class:`~jaxarith.models.family.Family` of ``cfg``."""
    return _family(cfg)


def param_specs(cfg: ModelConfig) -> dict:
    """Tree of :class:`ParamSpec` (shape, logical axes, init) for ``cfg``."""
    return family(cfg).param_specs(cfg)


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_axes(cfg: ModelConfig) -> dict:
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def abstract_params(cfg: ModelConfig, dtype=jnp.float32, mesh=None, *,
                    strict: bool | None = None):
    """``jax.ShapeDtypeStruct`` tree (with shardings when ``mesh`` is given); no memory used.

    ``strict``: a dimension that does not divide its mesh axes raises instead of being
    replicated (default: :func:`jaxarith.sharding.strict_sharding`'s setting).
    """
    def one(path, s: ParamSpec):
        shd = None
        if mesh is not None:
            shd = sharding.named_sharding(mesh, s.axes, s.shape, name=sharding.path_str(path),
                                          strict=strict)
        return jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype), sharding=shd)

    return jax.tree.map_with_path(one, param_specs(cfg), is_leaf=_is_spec)


def param_shardings(cfg: ModelConfig, mesh, *, strict: bool | None = None):
    return jax.tree.map(lambda a: a.sharding, abstract_params(cfg, mesh=mesh, strict=strict))


def _initial(spec: ParamSpec, normal) -> np.ndarray | jax.Array:
    """The one init rule: ``spec.init`` of zeros, ones, or ``spec.std`` times a standard normal
    drawn by ``normal(shape)`` (float32)."""
    if spec.init == "zeros":
        return np.zeros(spec.shape, np.float32)
    if spec.init == "ones":
        return np.ones(spec.shape, np.float32)
    return spec.std * normal(spec.shape)


def init_params(cfg: ModelConfig, key: jax.Array | int, dtype=jnp.float32, mesh=None) -> Params:
    """Random parameters by the family's :class:`ParamSpec` table, created on their shardings.

    Norm scales are ones, biases zeros, every other tensor normal with the spec's ``std``.

    Args:
      key: a JAX PRNG key: drawn on device, inside jit with ``out_shardings`` (no unsharded
        copy); or an int seed: drawn on the host with numpy, leaf ``i`` from
        ``default_rng([seed, i])``, then placed shard by shard (cheaper to start on CPU than
        compiling the initialiser; the training program uses it). Either way the result does
        not depend on the mesh.
      dtype: parameter dtype (draws are float32, then cast).
      mesh: place the parameters on this mesh by their logical axes.
    """
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    shardings = None if mesh is None else param_shardings(cfg, mesh)
    if isinstance(key, int | np.integer):
        shard_list = [None] * len(leaves) if mesh is None else jax.tree.leaves(shardings)
        out = []
        for i, (spec, shd) in enumerate(zip(leaves, shard_list, strict=True)):
            rng = np.random.default_rng([int(key), i])
            draw = lambda shape, rng=rng: rng.standard_normal(shape, np.float32)  # noqa: E731
            x = np.asarray(_initial(spec, draw), np.float32).astype(dtype)
            out.append(jnp.asarray(x) if shd is None else
                       jax.make_array_from_callback(spec.shape, shd, lambda idx, x=x: x[idx]))
        return jax.tree.unflatten(treedef, out)

    def make():
        keys = jax.random.split(key, len(leaves))
        out = []
        for k, s in zip(keys, leaves, strict=True):
            value = _initial(s, lambda shape, k=k: jax.random.normal(k, shape, jnp.float32))
            out.append(jnp.asarray(value).astype(dtype))
        return jax.tree.unflatten(treedef, out)

    return jax.jit(make, out_shardings=shardings)()


def num_params(cfg: ModelConfig) -> int:
    return sum(int(np.prod(s.shape)) for s in
               jax.tree.leaves(param_specs(cfg), is_leaf=_is_spec))


def check_token_ids(tokens, vocab_size: int, what: str = "tokens") -> None:
    """Raise :class:`ConfigError` if a concrete token id lies outside ``[0, vocab_size)``.

    Called at the API boundary (never inside jit: traced arrays are skipped), because the
    gather inside the model silently clamps out-of-range ids and gives wrong results.
    """
    if isinstance(tokens, jax.core.Tracer):
        return
    if isinstance(tokens, jax.Array) and not tokens.is_fully_addressable:
        return
    arr = np.asarray(tokens)
    if arr.size == 0:
        return
    if not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"{what}: token ids must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ConfigError(f"{what}: token id {bad} is outside the model's vocabulary "
                          f"[0, {vocab_size})")


def positions_from_mask(mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Positions [B, T] that count only real tokens (left or right padding both work)."""
    pos = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
    pos = pos + jnp.asarray(offset, jnp.int32)[..., None] if jnp.ndim(offset) else pos + offset
    return jnp.maximum(pos, 0)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
    )


CACHE_AXES = KVCache(
    k=("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    v=("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    valid=("batch", "cache_seq"),
    index=(),
)


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    dtype=jnp.float32,
    remat: remat_lib.Remat | str | bool = False,
    hidden_only: bool = False,
    attention: str = "xla",
    segment_ids: jax.Array | None = None,
) -> ForwardOutput:
    """Logits [B, T, V] (float32) of ``tokens`` [B, T], the updated cache if one is given, and
    what the family's blocks return besides the activations (a block may return ``(x, aux)``,
    e.g. Mixtral's router logits [L, B, T, E]), stacked over layers, or None: a
    :class:`ForwardOutput` ``(logits, cache, aux)``.

    Concrete ``tokens`` outside ``[0, vocab_size)`` raise :class:`ConfigError` (see
    :func:`check_token_ids`).

    Args:
      attention_mask: [B, T], 1 for real tokens, 0 for padding (left or right). Default all ones.
        Or, without a cache, a full [B, T, T] mask (query t may attend key s; it must be causal,
        with every query attending at least itself), e.g. several sequences packed in one row
        (see :mod:`jaxarith.eval.lmeval.scoring`); ``positions`` are then required.
      positions: [B, T]. Default: counted from the mask (and the cache's valid slots).
      cache: a :class:`KVCache`; the T tokens are written at ``cache.index`` and attend to all
        valid earlier slots.
      dtype: compute dtype; parameters are cast per block, norms and softmax run in float32.
      remat: what each block keeps for the backward pass: a :class:`~jaxarith.models.remat.Remat`
        policy name (``none``, ``full``, ``minimal``, ``save_dot_except_mlp``,
        ``save_qkv_proj``, ``save_out_proj``, ``offload``; :mod:`jaxarith.models.remat`), or
        True (``full``) / False (``none``).
      hidden_only: return the last block's output [B, T, D] (before the final norm and the
        output head) in place of the logits.
      attention: the cache-free causal attention: ``xla`` (blocked, the reference), or a
        kernel of :mod:`jaxarith.models.kernels` (``splash``, ``splash-interpret``, ``cudnn``;
        resolved from ``auto`` by :func:`jaxarith.models.kernels.resolve`). With a cache or a
        [B, T, T] mask the XLA path is always used.
      segment_ids: [B, T] int32, without a cache or a [B, T, T] mask: a token attends only to
        earlier tokens of its segment (packed documents, :mod:`jaxarith.data.pipeline`; give
        their ``positions`` too, restarting per document). XLA adds ``segment_q == segment_k``
        to the [B, T, S] mask its blocked attention already slices per query block (no bigger
        than the causal mask it replaces: [B, T, T] booleans, T^2 bytes per row); a kernel
        takes them as they are. Default: for a kernel, from a [B, T] ``attention_mask`` with
        padding (padding a segment of its own), else none.

    Sliding windows (``Family.attention_windows``) are distances in positions (a packed row's
    branches each count from their prefix); with a cache, a slot's position is the number of
    valid slots before it, as the default ``positions`` count. transformers counts cache slots:
    between the real tokens of a row the same distance. Splash counts slots too (packed
    documents are contiguous, each its own segment).
    """
    fam = family(cfg)
    remat = remat_lib.parse(remat)
    check_token_ids(tokens, cfg.vocab_size)
    b, t = tokens.shape
    full = attention_mask is not None and attention_mask.ndim == 3  # [B, T, T]: packed rows
    if full and (cache is not None or positions is None):
        raise ConfigError("a [B, T, T] attention_mask needs explicit positions and no cache")
    if segment_ids is not None and (full or cache is not None):
        raise ConfigError("segment_ids apply to a cache-free forward without a [B, T, T] mask")
    mask = jnp.ones((b, t), bool) if attention_mask is None or full else \
        attention_mask.astype(bool)
    if positions is None:
        prev = 0 if cache is None else jnp.sum(cache.valid, axis=-1, dtype=jnp.int32)
        positions = positions_from_mask(mask, prev)

    x = fam.embed(cfg, params, Inputs(tokens, positions, jnp.dtype(dtype))).astype(dtype)
    x = sharding.constrain(x, ("batch", "seq", "act_embed"))

    if cache is None:
        q_slots = jnp.arange(t)
        key_valid = mask
    else:
        q_slots = cache.index + jnp.arange(t)
        key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
    attn_mask = attention_mask.astype(bool) if full else make_attention_mask(q_slots, key_valid)
    if segment_ids is not None and attention == "xla":  # packed documents: [B, T, T]
        attn_mask = attn_mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    windows = fam.attention_windows(cfg)
    distance = None
    if windows is not None:  # keys' positions: the queries', or counted over the valid slots
        k_positions = positions if cache is None else \
            jnp.cumsum(key_valid.astype(jnp.int32), axis=-1) - 1
        distance = key_distance(positions, k_positions)
    if cache is None and not full and attention != "xla":
        if segment_ids is None and attention_mask is not None:
            segment_ids = mask.astype(jnp.int32)
        attn_fn = kernels.attention_fn(attention, segment_ids)
    elif cache is None:  # keys are the queries' own positions: skip blocks above the diagonal
        def attn_fn(q, k, v, *, scale, softcap=None, window=None):
            # and the key blocks before the window, unless a packed row's branches make the
            # distance in positions shorter than in slots
            return attend_causal(q, k, v, windowed(attn_mask, distance, window), scale,
                                 softcap, None if full else window)
    else:
        def attn_fn(q, k, v, *, scale, softcap=None, window=None):
            return attend(q, k, v, windowed(attn_mask, distance, window), scale, softcap)

    def body(x, xs):
        p, layer, kv = xs
        written = []

        def attention(q, k, v, *, scale, softcap=None):
            if kv is not None:  # write this block's keys/values into its cache slots
                k, v = update_cache_layer(kv[0], kv[1], k, v, cache.index)
                written.append((k, v))
                k, v = k.astype(q.dtype), v.astype(q.dtype)
            return checkpoint_name(_layer_attention(attn_fn, windows, layer, q, k, v,
                                                    scale=scale, softcap=softcap),
                                   remat_lib.CONTEXT)

        x = fam.block(cfg, p, x, BlockContext(positions, layer, attention))
        x, aux = x if isinstance(x, tuple) else (x, None)
        return sharding.constrain(x, ("batch", "seq", "act_embed")), \
            (written[0] if written else None, aux)

    body = remat_lib.checkpoint(body, remat)
    if isinstance(params["layers"], UnstackedLayers):  # see unstack_layers: a Python loop
        x, new_kv, aux = _unrolled(body, x, params["layers"], cache)
    else:
        kv_xs = None if cache is None else (cache.k, cache.v)
        layer_ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
        x, (new_kv, aux) = jax.lax.scan(body, x, (params["layers"], layer_ids, kv_xs))

    if hidden_only:
        logits = x
    else:
        logits = fam.unembed(cfg, params, x).astype(jnp.float32)
        logits = sharding.constrain(logits, ("batch", "seq", "act_vocab"))
    new_cache = None if cache is None else \
        KVCache(k=new_kv[0], v=new_kv[1], valid=key_valid, index=cache.index + t)
    return ForwardOutput(logits, new_cache, aux)


def _layer_attention(attn_fn, windows: tuple[int | None, ...] | None, layer, q, k, v, *,
                     scale, softcap):
    """``attn_fn`` with this layer's sliding window (a static table, so that kernels get static
    masks): the layer's own when ``layer`` is concrete (the unrolled decode loop) or every layer
    has the same; else ``lax.switch`` over one call per distinct window, by the layer index
    traced in the scan."""
    call = functools.partial(attn_fn, scale=scale, softcap=softcap)
    if windows is None:
        return call(q, k, v)
    distinct = sorted(set(windows), key=lambda w: -1 if w is None else w)
    if len(distinct) == 1:
        return call(q, k, v, window=distinct[0])
    if not isinstance(layer, jax.core.Tracer):
        return call(q, k, v, window=windows[int(layer)])
    which = jnp.asarray([distinct.index(w) for w in windows], jnp.int32)[layer]
    branches = [functools.partial(call, window=w) for w in distinct]
    return jax.lax.switch(which, branches, q, k, v)


def _unrolled(body, x, layers: tuple, cache: KVCache | None):
    """The layer scan as a Python loop over per-layer trees; the cache's k/v stay per layer
    (tuples) when they came as tuples, else they are stacked again."""
    kvs, auxs = [], []
    for i, p in enumerate(layers):
        kv = None if cache is None else (cache.k[i], cache.v[i])
        x, (new, aux) = body(x, (p, jnp.int32(i), kv))
        kvs.append(new)
        auxs.append(aux)
    aux = None if auxs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *auxs)
    if cache is None:
        return x, None, aux
    k, v = tuple(k for k, _ in kvs), tuple(v for _, v in kvs)
    if not isinstance(cache.k, tuple):
        k, v = jnp.stack(k), jnp.stack(v)
    return x, (k, v), aux


def unstack_layers(params: Params) -> Params:
    """``params`` with ``layers`` as :class:`UnstackedLayers`, per-layer trees (static slices of
    the stacked leaves). :func:`forward` then runs the layers as a Python loop.

    For decoding on the CPU: inside a ``while_loop`` over tokens, the stacked layout makes XLA
    copy every layer's weights out of the stack at every token (the ``dynamic-slice`` of the
    layer scan is not fused into the matmuls): about as much time as the matmuls themselves.
    Unstacked once before the loop, the weights are read in place. Costs one copy of the layer
    weights per call (transient memory).
    """
    stacked = params["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "layers": UnstackedLayers(jax.tree.map(lambda a, i=i: a[i], stacked)
                                                for i in range(n))}


def unstack_cache(cache: KVCache) -> KVCache:
    """The cache with ``k``/``v`` as tuples of per-layer ``[B, S, K, H]`` arrays (updated in
    place by the decode loop; see :func:`unstack_layers`)."""
    if isinstance(cache.k, tuple):
        return cache
    n = cache.k.shape[0]
    return cache._replace(k=tuple(cache.k[i] for i in range(n)),
                          v=tuple(cache.v[i] for i in range(n)))


def stack_cache(cache: KVCache) -> KVCache:
    """Inverse of :func:`unstack_cache`."""
    if not isinstance(cache.k, tuple):
        return cache
    return cache._replace(k=jnp.stack(cache.k), v=jnp.stack(cache.v))


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) [B, T] from logits [B, T, V], in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def next_token_loss(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    weights: jax.Array | None = None,
    dtype=jnp.float32,
    remat: remat_lib.Remat | str | bool = False,
    fused: bool = False,
    attention: str = "xla",
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood of next tokens and the number of predicted tokens.

    Token t+1 is scored when both t and t+1 are real tokens. Returns (nll_sum, count) so that
    windows and microbatches can be combined exactly.

    Args:
      weights: optional ``[B, T]`` float weights of each token *as a prediction target*
        (``weights[:, t]`` weighs the prediction of ``tokens[:, t]`` from the prefix; column 0 is
        never a target). E.g. 1 on assistant tokens and 0 elsewhere for instruction tuning. They
        multiply the attention-mask rule above; ``count`` is then their sum.
      fused: compute the output head and the cross-entropy together, in chunks along T, with
        the gradient made in the forward pass (:mod:`jaxarith.models.fused_ce`): the ``[B, T,
        V]`` logits are never held. Same value to float32 rounding; the training default.
        Families without a ``head`` use the logits path.
      segment_ids, positions: ``[B, T]`` packed documents (see :func:`forward`). The target
        after a segment's last token (the next document's first token, predicted at an EOS)
        is kept, as Levanter and MaxText keep it (:mod:`jaxarith.data.pipeline`).
    """
    mask = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    fam = family(cfg)
    packed = {} if segment_ids is None else {"segment_ids": segment_ids, "positions": positions}
    if fused and fam.head is not None:
        x, _, _ = forward(params, cfg, tokens, attention_mask=mask, dtype=dtype, remat=remat,
                          hidden_only=True, attention=attention, **packed)
        h, w, vocab_major = fam.head(cfg, params, x)
        weight = target_weights(mask, weights)
        # position t predicts token t + 1; the last position predicts nothing (weight 0)
        targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
        weight = jnp.concatenate([weight, jnp.zeros_like(weight[:, :1])], axis=1)
        nll = linear_cross_entropy(h, w, targets, weight, vocab_major=vocab_major,
                                   softcap=fam.logit_softcap(cfg))
        return nll, jnp.sum(weight)
    logits, _, _ = forward(params, cfg, tokens, attention_mask=mask, dtype=dtype, remat=remat,
                           attention=attention, **packed)
    return nll_from_logits(logits, tokens, mask, weights)


def target_weights(mask: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """[B, T - 1] float32 weight of predicting token t + 1 from position t: both real tokens,
    times ``weights[:, 1:]`` when given."""
    mask = mask.astype(bool)
    weight = (mask[:, :-1] & mask[:, 1:]).astype(jnp.float32)
    if weights is not None:
        weight = weight * weights[:, 1:].astype(jnp.float32)
    return weight


def nll_from_logits(logits: jax.Array, tokens: jax.Array, mask: jax.Array,
                    weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(nll_sum, count) of :func:`next_token_loss` from the logits [B, T, V] of ``tokens``."""
    mask = mask.astype(bool)
    # logsumexp over the full logits, then slice the small [B, T] result: slicing
    # logits[:, :-1] first makes XLA copy the whole [B, T, V] tensor before the softmax.
    lse = jax.nn.logsumexp(logits, axis=-1)[:, :-1]
    lp = jnp.take_along_axis(logits[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0] - lse
    weight = target_weights(mask, weights)
    return -jnp.sum(lp * weight), jnp.sum(weight)


# ----------------------------------------------------------------------------- Flax NNX face


class CausalLM(nnx.Module):
    """A decoder as an NNX module whose Param state is exactly the canonical tree.

    ``CausalLM(cfg, rngs=nnx.Rngs(0))`` initialises randomly; ``CausalLM.from_params(cfg, params)``
    wraps loaded weights (no copy). Every Param carries ``logical_axes`` metadata.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None,
                 params: Params | None = None, param_dtype=jnp.float32, mesh=None):
        self.config = cfg
        if params is None:
            key = (rngs or nnx.Rngs(0)).params()
            params = init_params(cfg, key, param_dtype, mesh)
        axes = param_axes(cfg)
        wrapped = jax.tree.map(lambda a, ax: nnx.Param(a, logical_axes=ax), params, axes)
        for name, value in wrapped.items():
            setattr(self, name, nnx.data(value))

    @classmethod
    def from_params(cls, cfg: ModelConfig, params: Params) -> CausalLM:
        return cls(cfg, params=params)

    def params(self) -> Params:
        return nnx.state(self, nnx.Param).to_pure_dict()

    def __call__(self, tokens, *, attention_mask=None, positions=None, cache=None,
                 dtype=jnp.float32, remat=False):
        logits, new_cache, _ = forward(self.params(), self.config, tokens,
                                    attention_mask=attention_mask, positions=positions,
                                    cache=cache, dtype=dtype, remat=remat)
        return logits if cache is None else (logits, new_cache)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _jit_forward(params: Params, cfg: ModelConfig, tokens, attention_mask, dtype=jnp.float32):
    return forward(params, cfg, tokens, attention_mask=attention_mask, dtype=dtype)[0]


def jit_forward(params: Params, cfg: ModelConfig, tokens, attention_mask, dtype=jnp.float32):
    """``forward`` compiled once per (config, shapes, dtype); logits only. Token ids are checked
    against the vocabulary before the call."""
    check_token_ids(tokens, cfg.vocab_size)
    return _jit_forward(params, cfg, tokens, attention_mask, dtype=dtype)
