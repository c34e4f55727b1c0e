"""Attention kernels behind one name: ``xla``, ``splash``, ``cudnn`` (and ``auto``).

- ``xla``: :func:`jaxarith.models.layers.attend_causal`, blocked causal attention in plain XLA
  (the reference; the default on CPU).
- ``splash``: Pallas' TPU splash attention (``jax.experimental.pallas.ops.tpu``), causal, with
  GQA/MQA (one MQA kernel per key/value head, vmapped), segment ids, a sliding window (its
  ``LocalMask``, which skips the blocks outside the window) and logit soft-capping. A Mosaic
  kernel cannot be partitioned automatically, so it runs inside ``shard_map``: batch over the
  data-parallel axes (``data``, ``fsdp``), heads over ``tensor``. It never materialises the
  ``[T, T]`` scores. ``interpret=True`` runs it on any backend (tests, on the CPU).
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (flash attention on an
  NVIDIA GPU; bf16/fp16 inputs; a sliding window as its ``local_window_size``; no soft-capping).
- ``auto``: splash on TPU, cudnn on a GPU, xla elsewhere (:func:`resolve`, from the mesh's
  devices).

Every kernel takes ``window`` (a static int, or None) and ``softcap``: a layer's sliding window is
chosen by the driver, which selects among one kernel per distinct window with ``lax.switch``
when the layers differ (Gemma's alternating local and global layers), since a kernel's mask is
static. Decoding with a KV cache keeps XLA attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxarith.errors import ConfigError

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
SPLASH_BLOCK = 512  # the largest query/key block splash uses (smaller when T is)


def resolve(impl: str, mesh=None, seq_len: int | None = None) -> str:
    """The implementation ``forward`` gets: ``auto`` replaced by what suits the mesh's devices
    (splash only when ``seq_len`` is a multiple of 128), and ``splash`` away from a TPU as
    ``splash-interpret`` (the same kernel run by the Pallas interpreter)."""
    if impl not in IMPLEMENTATIONS:
        raise ConfigError(f"model.attention={impl!r}: expected one of "
                          f"{', '.join(IMPLEMENTATIONS)}")
    platform = (mesh.devices.flat[0].platform if mesh is not None
                else jax.default_backend()).lower()
    if impl == "auto":
        impl = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform, "xla")
        if impl == "splash" and seq_len is not None and seq_len % 128:
            impl = "xla"
    if impl == "splash" and platform != "tpu":
        return "splash-interpret"
    return impl


def attention_fn(impl: str, segment_ids=None):
    """``fn(q, k, v, *, scale, softcap=None, window=None)`` of a cache-free causal forward for a
    resolved ``impl`` (``xla`` is handled by the caller, which knows the full mask)."""
    if impl in ("splash", "splash-interpret"):
        return functools.partial(splash_attention, segment_ids=segment_ids,
                                 interpret=impl == "splash-interpret")
    if impl == "cudnn":
        if segment_ids is not None:
            raise ConfigError("attention=cudnn: padding or packed segments are not supported; "
                              "use xla or splash")
        return cudnn_attention
    raise ConfigError(f"attention {impl!r}: expected xla, splash, splash-interpret or cudnn")


def _block(t: int) -> int:
    for b in (SPLASH_BLOCK, 256, 128):
        if t % b == 0:
            return b
    raise ConfigError(f"splash attention needs a sequence length divisible by 128, got {t}")


def _splash_kernel(t: int, groups: int, interpret: bool, window: int | None = None,
                   softcap: float | None = None):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b = _block(t)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                          block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # a window of W keys: q - (W - 1) <= k <= q, transformers' ``q - k < W``
    one = sm.CausalMask((t, t)) if window is None else \
        sm.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    mask = sm.MultiHeadMask([one] * groups)
    # built per trace, not cached: its mask metadata are arrays of the trace that builds it
    return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret,
                                            attn_logits_soft_cap=softcap)


def _splash_local(q, k, v, segment_ids, scale, *, interpret: bool, window: int | None = None,
                  softcap: float | None = None):
    """Splash on one shard: q [b, T, N, H], k/v [b, T, K, H], segment_ids [b, T] or None."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, n, h = q.shape
    kv = k.shape[2]
    g = n // kv
    kernel = _splash_kernel(t, g, interpret, window, softcap)
    # [b, K, G, T, H] queries (scaled: splash does not scale), [b, K, T, H] keys and values
    qq = (q.astype(jnp.float32) * scale).astype(q.dtype).reshape(b, t, kv, g, h)
    qq = qq.transpose(0, 2, 3, 1, 4)
    kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def one(q1, k1, v1, s1):  # q1 [G, T, H], k1/v1 [T, H], s1 [T] or None
        seg = None if s1 is None else sk.SegmentIds(q=s1, kv=s1)
        return kernel(q1, k1, v1, segment_ids=seg)

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head, in_axes=(0, 0, 0, None if segment_ids is None else 0))(
        qq, kk, vv, segment_ids)  # [b, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def splash_attention(q, k, v, *, scale: float, segment_ids=None, mesh=None,
                     interpret: bool = False, softcap: float | None = None,
                     window: int | None = None):
    """Causal attention with splash: q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H].

    ``segment_ids`` [B, T] int32: a query attends only keys of its own segment (packed
    documents; padding as a segment of its own). ``mesh``: the mesh the arrays are sharded over
    (default: the one set by ``jax.set_mesh``); None and no mesh set: one device. ``window``: a
    query attends only the ``window`` slots up to itself (static). ``softcap``: scaled scores
    are soft-capped, ``softcap * tanh(s / softcap)``.
    """
    fn = functools.partial(_splash_local, interpret=interpret, window=window, softcap=softcap)
    scale = jnp.asarray(scale, jnp.float32)  # may be traced (GPT-2 scales by layer)
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            return fn(q, k, v, segment_ids, scale)
    batch = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    batch = batch or None
    heads = "tensor" if "tensor" in mesh.axis_names and mesh.shape["tensor"] > 1 else None
    if heads is not None and k.shape[2] % mesh.shape["tensor"]:
        heads = None  # fewer key/value heads than the tensor axis: heads stay whole
    act = P(batch, None, heads, None)
    specs = (act, act, act, None if segment_ids is None else P(batch, None), P())
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=act, check_vma=False)(
        q, k, v, segment_ids, scale)


def cudnn_attention(q, k, v, *, scale: float, softcap: float | None = None,
                    window: int | None = None):
    """Causal attention through cuDNN's fused kernel (GPU); ``window``: keys within ``window``
    slots of the query (static)."""
    if softcap is not None:
        raise ConfigError("attention=cudnn: attention-logit soft-capping (Gemma 2's "
                          "attn_logit_softcapping) is not supported; use xla or splash")
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        local_window_size=local, implementation="cudnn")
