"""A small safetensors reader and streaming writer.

Why not ``safetensors.safe_open``: jaxarith needs bfloat16 as numpy (via ml_dtypes), reads that
touch only the bytes asked for and release them after use, and errors that say *which* file is
truncated or corrupt. The file format is simple: an 8-byte little-endian header length, a JSON
header mapping each tensor name to ``{dtype, shape, data_offsets}``, then the raw bytes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

from jaxarith.errors import CheckpointError
from jaxarith.io.convert.fastcopy import contiguous
from jaxarith.io.finite import check_input, check_output

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """Lazily reads tensors from one ``.safetensors`` file; validates the header on open."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8:
                    raise CheckpointError(
                        f"{self.path}: corrupt safetensors header (length {n} > file size {size})"
                    )
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"safetensors file not found: {self.path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries = header
        end = 0
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype "
                                      f"{e.get('dtype')!r}")
            lo, hi = e["data_offsets"]
            want = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if hi - lo != want:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {hi - lo} bytes but "
                                      f"shape {e['shape']} needs {want}")
            end = max(end, hi)
        if self._data_start + end > size:
            raise CheckpointError(
                f"{self.path}: truncated safetensors file ({size} bytes, header needs "
                f"{self._data_start + end})"
            )

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def nbytes(self, name: str) -> int:
        lo, hi = self._entries[name]["data_offsets"]
        return hi - lo

    def get(self, name: str) -> np.ndarray:
        """The tensor as a fresh numpy array.

        Read with ``readinto`` rather than through a memory map: pages of a long-lived map stay
        resident (and count in RSS) after use, so streaming a checkpoint through one map grows
        memory with the model instead of staying at one tensor.
        """
        e = self._entries[name]
        lo, hi = e["data_offsets"]
        out = np.empty(e["shape"], DTYPES[e["dtype"]])
        with open(self.path, "rb") as f:
            f.seek(self._data_start + lo)
            if f.readinto(out.reshape(-1).view(np.uint8)) != hi - lo:
                raise CheckpointError(f"{self.path}: short read of tensor {name!r}")
        check_input(out, name, self.path)
        return out


    def view(self, name: str) -> np.ndarray:
        """The tensor as a read-only array memory-mapped from the file: no copy, no buffer.

        A map of this one tensor's bytes (page-aligned), unmapped when the array is released,
        so streaming a checkpoint through it keeps only the tensors in use resident (unlike one
        long-lived map of the whole file). The kernel is asked to read the range ahead.
        """
        e = self._entries[name]
        lo, hi = e["data_offsets"]
        shape, dtype = tuple(e["shape"]), DTYPES[e["dtype"]]
        if hi == lo:
            return np.empty(shape, dtype)
        start = self._data_start + lo
        base = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self.path, "rb") as f:
                mm = mmap.mmap(f.fileno(), start - base + hi - lo, access=mmap.ACCESS_READ,
                               offset=base)
        except (OSError, ValueError) as err:  # e.g. the file shrank since its header was read
            raise CheckpointError(f"{self.path}: cannot map tensor {name!r} ({err})") from None
        if hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_WILLNEED)
        out = np.frombuffer(mm, dtype, count=(hi - lo) // dtype.itemsize, offset=start - base)
        out = out.reshape(shape)
        check_input(out, name, self.path)
        return out


def write_safetensors(
    path: str | os.PathLike,
    specs: list[tuple[str, tuple[int, ...], np.dtype]],
    arrays: Iterable[np.ndarray],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file streaming: header from ``specs``, then each array as it comes.

    ``arrays`` yields the tensors in the order of ``specs`` (e.g. a generator that gathers one
    tensor at a time), so only one tensor is on the host at once. Returns bytes written.
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape, dtype), arr in zip(specs, arrays, strict=True):
            arr = contiguous(arr)  # tiled when arr is a transposed view
            if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise CheckpointError(f"{name}: got {arr.dtype}{list(arr.shape)}, header says "
                                      f"{np.dtype(dtype)}{list(shape)}")
            check_output(arr, name, os.path.basename(os.fspath(path)))
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))  # no bytes copy
    return 8 + len(blob) + offset
