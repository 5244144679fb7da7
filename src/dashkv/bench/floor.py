"""The memory floor of a tiered decode step: reading what its tiers need, and nothing else.

The fused kernel must read every key code once, and, per query head, the K rows of its high keys and
the V rows of its high and mid keys. :func:`read_rows` reads exactly those in the kernel's order
(tasks of one KV head and one chunk, the GQA group's heads in turn, rows prefetched
:data:`~dashkv.ops.cpu.jit.AHEAD` ahead) and only sums them: no distances, no selection, no
softmax. Its time is what any kernel with the same tiers pays for memory on this machine, so ``SDPA
time / floor time`` bounds the speed-up that these tiers can give. Random row gathers run well below
the streaming read bandwidth (at 128K keys, gathering 20 % of the V rows for each of 9 query heads
took as long as streaming all of V), which is why the floor is measured, not computed from a byte
count.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from dashkv.ops.cpu.jit import AHEAD, FASTMATH, JIT, PJIT, prefetch
from dashkv.ops.reference import HIGH, MID


def row_lists(tiers: torch.Tensor, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per (query head, chunk) lists of the positions whose K and whose V rows the tiers read.

    Parameters
    ----------
    tiers : Tensor[1, H, 1, S] int8 -- one decode token of batch 1, as the benchmark times it
    chunk : int -- keys per task, as the fused kernel's

    Returns
    -------
    k_idx, k_off, v_idx, v_off : the positions of high keys (K rows) and of high and mid keys (V rows)
        of head ``h`` and chunk ``c`` are ``k_idx[k_off[h, c] : k_off[h, c + 1]]`` (and ``v_*``)
    """
    if tiers.dim() != 4 or tiers.shape[0] != 1 or tiers.shape[2] != 1:
        raise ValueError(f"tiers must be [1, H, 1, S] (one decode token), got {tuple(tiers.shape)}")
    per_head = tiers[0, :, 0].numpy()
    seq = per_head.shape[1]
    bounds = np.arange(0, seq + chunk, chunk).clip(max=seq)

    def lists(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positions = [np.flatnonzero(r) for r in rows]
        off = np.stack([np.searchsorted(p, bounds) for p in positions])
        off += np.cumsum([0] + [len(p) for p in positions[:-1]])[:, None]
        return np.concatenate(positions).astype(np.int64), off.astype(np.int64)

    k_idx, k_off = lists(per_head == HIGH)
    v_idx, v_off = lists((per_head == HIGH) | (per_head == MID))
    return k_idx, k_off, v_idx, v_off


@njit(fastmath=FASTMATH, **JIT)
def _sum_rows(rows, idx, lo, hi, base, acc):
    dim = rows.shape[1]
    line = 64 // rows.itemsize
    for i in range(lo, min(hi, lo + AHEAD)):
        for j in range(0, dim, line):
            prefetch(rows, base + idx[i], j)
    for i in range(lo, hi):
        if i + AHEAD < hi:
            for j in range(0, dim, line):
                prefetch(rows, base + idx[np.uintp(i + AHEAD)], j)
        row = np.uintp(base + idx[np.uintp(i)])
        for j in range(dim):
            acc[j] += rows[row, j]


@njit(fastmath=FASTMATH, **PJIT)
def read_rows(keys, vals, codes, k_idx, k_off, v_idx, v_off, kheads, chunk, out, code_out):
    """XOR the key codes (``codes [Hkv * S, W]`` int64) of each (KV head, chunk) into ``code_out
    [Hkv, chunks]`` and sum the listed K and V rows (``keys``/``vals [Hkv * S, D]`` fp32) into ``out
    [H, chunks, D]``.

    One task is a (KV head, chunk), as in the fused kernel, so a row shared by the group's heads is
    read from memory once and from L2 after that."""
    heads, nch = out.shape[0], out.shape[1]
    seq = keys.shape[0] // kheads
    groups = heads // kheads
    for task in prange(kheads * nch):
        kvh = task // nch
        c = task % nch
        base = kvh * seq
        mix = np.int64(0)
        for s in range(base + c * chunk, base + min(seq, (c + 1) * chunk)):
            for w in range(codes.shape[1]):
                mix ^= codes[s, w]
        code_out[kvh, c] = mix
        for g in range(groups):
            h = kvh * groups + g
            acc = out[h, c]
            acc[:] = 0.0
            _sum_rows(keys, k_idx, k_off[h, c], k_off[h, c + 1], base, acc)
            _sum_rows(vals, v_idx, v_off[h, c], v_off[h, c + 1], base, acc)
    return out
