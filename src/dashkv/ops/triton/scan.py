"""The code scan: XOR + popcount of packed codes, and per (row, chunk) histograms of the distances.

A program is one (batch, KV head, chunk): the chunk's key codes are read from memory once and reused
from cache by every query head and token of the GQA group.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dashkv.ops.triton.common import chunk_of_row, popcount64


@triton.jit
def _hamming(qc_ptr, q_off, qcsw, kc_ptr, k_off, kcsw, inb, W: tl.constexpr):
    """Distances of one query code (words at ``q_off``) to a tile of key codes (rows at ``k_off``)."""
    acc = tl.zeros(k_off.shape, tl.int32)
    for w in tl.static_range(W):
        qw = tl.load(qc_ptr + q_off + w * qcsw)
        kw = tl.load(kc_ptr + k_off + w * kcsw, mask=inb, other=0)
        acc += popcount64(qw ^ kw)
    return acc


@triton.jit
def scan_kernel(
    qc_ptr, qcsb, qcsh, qcst, qcsw,
    kc_ptr, kcsb, kcsh, kcss, kcsw,
    code_ptr, csb, csh, cst, css,
    dist_ptr, hist_ptr,
    H, HKV, T, S, NCH,
    W: tl.constexpr, CHUNK: tl.constexpr, NBP: tl.constexpr, GROUP: tl.constexpr, WANT_HIST: tl.constexpr,
):  # fmt: skip
    """Raw distances of every selection row into ``dist [rows, S]`` and, if ``WANT_HIST``, histograms of
    the eligible keys' (mask code 1) distances into ``hist [rows, NCH, NBP]`` (bin = distance).

    Rows are (batch, query head, token); with ``GROUP`` (batch, KV head, token), holding each key's
    distance to the nearest of the group's query heads. Grid: ``(B * HKV, NCH)``.
    """
    pid = tl.program_id(0)
    c = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)
    kvh = pid % HKV
    G = H // HKV
    offs = c * CHUNK + tl.arange(0, CHUNK)
    inb = offs < S
    k_off = b * kcsb + kvh * kcsh + offs.to(tl.int64) * kcss
    n_rows = T if GROUP else G * T
    for r in range(n_rows):
        if GROUP:
            t = r
            h = kvh * G
            srow = (b * HKV + kvh) * T + t
            d = _hamming(qc_ptr, b * qcsb + h * qcsh + t * qcst, qcsw, kc_ptr, k_off, kcsw, inb, W)
            for g in range(1, G):
                d = tl.minimum(d, _hamming(qc_ptr, b * qcsb + (h + g) * qcsh + t * qcst, qcsw, kc_ptr, k_off, kcsw,
                                           inb, W))  # fmt: skip
        else:
            t = r % T
            h = kvh * G + r // T
            srow = (b * H + h) * T + t
            d = _hamming(qc_ptr, b * qcsb + h * qcsh + t * qcst, qcsw, kc_ptr, k_off, kcsw, inb, W)
        tl.store(dist_ptr + srow * S + offs, d.to(dist_ptr.dtype.element_ty), mask=inb)
        if WANT_HIST:
            code = tl.load(code_ptr + b * csb + h * csh + t * cst + offs * css, mask=inb, other=0)
            keep = inb & (code == 1)
            counts = tl.histogram(tl.where(keep, d, 0), NBP, mask=keep)
            tl.store(hist_ptr + (srow * NCH + c) * NBP + tl.arange(0, NBP), counts)


@triton.jit
def dense_hist_kernel(
    dist_ptr, code_ptr, csb, csh, cst, css, hist_ptr, H, T, S, NCH, lo, NV,
    CHUNK: tl.constexpr, NBP: tl.constexpr,
):  # fmt: skip
    """Histograms ``hist [rows, NCH, NBP]`` of given distances ``dist [rows, S]`` (rows (b, h, t)) over
    the keys of mask code 1, bin = ``clamp(distance - lo, 0, NV - 1)`` (as the reference's histogram). Grid: ``(rows, NCH)``."""
    row, c, offs, inb, d, code = chunk_of_row(dist_ptr, code_ptr, csb, csh, cst, css, H, T, S, CHUNK)
    d = d - lo
    keep = inb & (code == 1)
    counts = tl.histogram(tl.where(keep, tl.minimum(tl.maximum(d, 0), NV - 1), 0), NBP, mask=keep)
    tl.store(hist_ptr + (row * NCH + c) * NBP + tl.arange(0, NBP), counts)
