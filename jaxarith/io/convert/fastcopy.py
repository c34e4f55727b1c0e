"""Cache-friendly copies of transposed views (the conversion hooks' only real work).

HF stores linear weights ``[out, in]``, the canonical tree ``[in, ...]``; converting is a
transpose. numpy copies a transposed view element by element in destination order, so every
read of a ``[128256, 2048]`` bfloat16 matrix jumps 4 KiB and misses the cache: 15 s for 0.5 GB on
this CPU, against ~3 s when the copy goes through square tiles. :func:`copy_into` tiles any
copy whose source is not contiguous; :func:`contiguous` is ``np.ascontiguousarray`` built on it.
"""

from __future__ import annotations

import numpy as np

TILE = 256
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# Below this many elements a plain numpy copy is as fast (the array fits in cache).
MIN_TILED = 1 << 16


def _as_2d(x: np.ndarray) -> np.ndarray | None:
    """``x`` as ``[shape[0], prod(rest)]`` without a copy, or None if that needs one."""
    y = x.view()
    try:
        y.shape = (x.shape[0], -1)
    except AttributeError:  # numpy cannot express it as a view
        return None
    return y


def copy_into(dst: np.ndarray, src: np.ndarray, tile: int = TILE) -> None:
    """``dst[...] = src`` (with dtype conversion), tiled when ``src`` is a strided view.

    Args:
      dst: a C-contiguous destination array.
      src: an array of the same shape, typically a transposed/reshaped view of a loaded tensor.
      tile: edge of the square tiles.
    """
    if dst.shape != src.shape:
        raise ValueError(f"copy_into: shapes differ, {dst.shape} vs {src.shape}")
    if dst.dtype == src.dtype and dst.dtype.itemsize in _UINT and dst.dtype.kind != "O":
        # the same bits as unsigned integers: numpy's fast strided loops (ml_dtypes' bfloat16
        # copies element by element through the dtype's own functions, holding the GIL)
        u = _UINT[dst.dtype.itemsize]
        dst, src = dst.view(u), src.view(u)
    if src.ndim < 2 or src.size < MIN_TILED or src.flags.c_contiguous:
        dst[...] = src
        return
    d2, s2 = _as_2d(dst), _as_2d(src)
    if d2 is None or s2 is None or s2.flags.c_contiguous:
        dst[...] = src
        return
    rows, cols = s2.shape
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            d2[i:i + tile, j:j + tile] = s2[i:i + tile, j:j + tile]


def contiguous(x: np.ndarray, dtype=None) -> np.ndarray:
    """A C-contiguous copy of ``x`` in ``dtype`` (``x`` itself when nothing needs to change)."""
    dtype = np.dtype(dtype or x.dtype)
    if x.flags.c_contiguous and x.dtype == dtype:
        return x
    out = np.empty(x.shape, dtype)
    copy_into(out, x)
    return out


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """``np.empty`` whose data starts on an ``align``-byte boundary: ``jax.device_put`` of such
    a host array on CPU aliases it (zero-copy) instead of copying it into a new buffer."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    off = -raw.ctypes.data % align
    return raw[off:off + n].view(dtype).reshape(shape)
