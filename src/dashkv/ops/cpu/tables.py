"""Per-head lookup tables of the mid-tier estimate: the residual's byte tables and the cosine of each
Hamming distance (:func:`dashkv.ops.reference.mid_tier_logits`)."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import njit

from dashkv.ops.cpu.jit import JIT


@njit(**JIT)
def byte_tables(phi):
    """``tab[h, j, v]``: sum of the bit weights ``phi[h, 8 j + b]`` over the bits ``b`` set in byte ``v``."""
    heads, bits = phi.shape
    tab = np.zeros((heads, 16, 256), np.float32)
    for h in range(heads):
        for j in range(16):
            for b in range(8):
                w = phi[h, 8 * j + b] if 8 * j + b < bits else np.float32(0.0)
                for v in range(1 << b):  # bytes with top bit b: those below it plus phi_b
                    tab[h, j, (1 << b) + v] = tab[h, j, v] + w
    return tab


@functools.lru_cache(maxsize=16)
def cos_table(bits: int) -> np.ndarray:
    """``cos(pi * d / R)`` for ``d = 0..R``, computed as the reference does (fp32 torch)."""
    return torch.cos(math.pi * torch.arange(bits + 1, dtype=torch.float32) / bits).numpy()


_TABLES: dict[tuple, tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}
_TABLES_LIMIT = 256  # entries: a few models' layers


def residual_tables(residual: torch.Tensor, heads: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte tables (:func:`byte_tables`) and ``sum phi`` per head of the residual bit weights ``[H, R]``,
    kept between calls of the per-op functions (a layer plan builds its own once). A hit needs equal
    contents (``torch.equal`` with a private copy), so weights changed in place, or freed and their
    memory reused, are never served stale tables."""
    weights = residual.detach().to(torch.float32).reshape(heads, -1)[:, :bits]
    key = (weights.data_ptr(), heads, bits)
    hit = _TABLES.get(key)
    if hit is not None and torch.equal(hit[0], weights):
        return hit[1], hit[2]
    if len(_TABLES) >= _TABLES_LIMIT:
        _TABLES.clear()
    copy = weights.clone()
    tab = byte_tables(np.ascontiguousarray(copy.numpy()))
    sumphi = copy.sum(-1).numpy()
    _TABLES[key] = (copy, tab, sumphi)
    return tab, sumphi
