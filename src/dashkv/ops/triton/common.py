"""Pieces shared by several Triton kernels: popcount, the exact selection rule, histogram bins.

One helper per rule, so the scan, the votes and the tiered attention cannot drift apart.
"""

from __future__ import annotations

import triton
import triton.language as tl

CHUNK = 1024
"""Keys per split-K chunk: one (row, chunk) histogram, one tie base and one softmax partial each. Tests
shrink it to reach several chunks with few keys."""

BLOCK = 64
"""Keys per sub-block of the attention kernel (a ``[BLOCK, D]`` tile of K or V); divides :data:`CHUNK`."""

BLOCK_M = 16
"""Query rows (a GQA group's heads times query tokens) per attention program: the smallest ``tl.dot`` tile."""


def pow2(n: int, least: int = 1) -> int:
    """The smallest power of two ``>= max(n, least)`` (Triton tiles have power-of-two sizes)."""
    return max(triton.next_power_of_2(max(int(n), 1)), least)


@triton.jit
def popcount64(x):
    """Set bits of each int64 word (SWAR, as :func:`dashkv.ops.reference.popcount64`): arithmetic shifts
    are safe because every mask clears the bits a sign extension fills."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return (x & 0x7F).to(tl.int32)


@triton.jit
def selected(d, eligible, thr, need, rank):
    """The rule of :func:`dashkv.ops.reference.select_smallest`: eligible keys below the threshold, and
    ties at it while their rank counted from the latest key (``rank``, 1 for the latest tie) is within
    ``need``."""
    return eligible & ((d < thr) | ((d == thr) & (rank <= need)))


@triton.jit
def chunk_of_row(dist_ptr, code_ptr, csb, csh, cst, css, H, T, S, CHUNK: tl.constexpr):
    """The program's (row, chunk) of a ``(rows, NCH)`` grid over given distances ``dist [rows, S]`` (rows
    ``(b, h, t)``): the row, the chunk, its key offsets, which are in bounds, their distances (int32) and
    mask codes (strides ``csb, csh, cst, css`` of the mask)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    b = row // (H * T)
    h = (row // T) % H
    t = row % T
    offs = c * CHUNK + tl.arange(0, CHUNK)
    inb = offs < S
    d = tl.load(dist_ptr + row * S + offs, mask=inb, other=0).to(tl.int32)
    code = tl.load(code_ptr + b * csb + h * csh + t * cst + offs * css, mask=inb, other=0)
    return row, c, offs, inb, d, code
