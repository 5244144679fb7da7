"""Reusable buffers for the large per-call intermediates of the fused step (per thread and name)."""

from __future__ import annotations

import math
import threading

import numpy as np

from dashkv.ops.cpu.views import dist_dtype

_SCRATCH = threading.local()
_SCRATCH_LIMIT = 32 * 2**20  # bytes a kept buffer may have
_NOT_KEPT = (np.empty((1, 1), np.int32), np.empty((1, 1), np.float32))  # nothing reads the attended keys


def scratch(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A reusable uninitialised buffer: the fused step's per-call intermediates skip the allocation and
    the page faults of fresh memory. The caller overwrites it whole."""
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    size = math.prod(shape)
    if size * np.dtype(dtype).itemsize > _SCRATCH_LIMIT:  # large query blocks: not worth keeping
        return np.empty(shape, dtype)
    buf = pool.get((name, np.dtype(dtype)))
    if buf is None or buf.size < size:
        buf = np.empty(max(size, 1), dtype)
        pool[(name, np.dtype(dtype))] = buf
    return buf[:size].reshape(shape)


def step_scratch(rows: int, offset_rows: int, seq: int, top: int, kept_rows: int) -> tuple[np.ndarray, ...]:
    """The fused step's distances ``[rows, S]`` (one byte a key while ``top`` fits), per-key offsets
    ``[offset_rows, S]`` (int16: two discounts of up to ``MAX_DISCOUNT`` bits) and each query row's
    attended keys and weights ``[kept_rows, S]`` (int32, float32; ``[1, 1]`` where ``kept_rows`` is 0:
    nothing reads them), uninitialised."""
    kept = _NOT_KEPT
    if kept_rows:
        kept = scratch("kept_keys", (kept_rows, seq), np.int32), scratch("kept_weights", (kept_rows, seq), np.float32)
    return scratch("dist", (rows, seq), dist_dtype(top)), scratch("off", (offset_rows, seq), np.int16), *kept
