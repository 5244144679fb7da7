"""Sort-free exact selection: thresholds from histograms, the selection and tiers of given distances,
and the calibration pass (cross-head consensus votes, momentum) of the fused step.

Ties at a threshold go to the latest keys. A chunk's ties are ranked from its end by a reverse cumsum,
after the ties of all later chunks (the chunk's *tie base*, from the per-chunk histograms).
"""

from __future__ import annotations

import triton
import triton.language as tl

from dashkv.ops.triton.common import chunk_of_row, selected


@triton.jit
def thresholds_kernel(
    hist_ptr, k_ptr, frac_ptr, thr_ptr, need_ptr, tb_ptr, ROWS, NCH, lo, NV,
    NK: tl.constexpr, FROM_FRACTION: tl.constexpr, NBP: tl.constexpr, CB: tl.constexpr,
):  # fmt: skip
    """Per row and for each of ``NK`` key counts: the k-th smallest distance ``thr`` (``lo`` for k = 0,
    ``lo + NV`` for k > n, as :func:`dashkv.ops.reference.kth_smallest`), the ties it still needs
    ``need = k - #(d < thr)`` and each chunk's tie base ``tb [NK, ROWS, NCH]`` (ties in later chunks).

    ``hist [ROWS, NCH, NBP]`` per-chunk counts, bin = distance - lo, ``NV`` bins used. The counts are
    ``k [NK, ROWS]`` or, with ``FROM_FRACTION``, :func:`dashkv.ops.reference.budget_counts` of the
    row's eligible keys for the float64 fractions ``frac [NK + 1]`` (last: the rounding epsilon). Grid: ``(ROWS,)``.
    """
    row = tl.program_id(0).to(tl.int64)
    bins = tl.arange(0, NBP)
    chunks = tl.arange(0, CB)
    total = tl.zeros([NBP], tl.int32)
    for c0 in range(0, NCH, CB):
        cs = c0 + chunks
        tile = tl.load(hist_ptr + (row * NCH + cs[:, None]) * NBP + bins[None, :], mask=(cs < NCH)[:, None], other=0)
        total += tl.sum(tile, 0)
    n = tl.sum(total, 0).to(tl.int64)
    cum = tl.cumsum(total, 0)
    n_tiles = tl.cdiv(NCH, CB)
    for i in tl.static_range(NK):
        if FROM_FRACTION:
            frac = tl.load(frac_ptr + i)
            eps = tl.load(frac_ptr + NK)  # the reference's 1e-9, in float64
            k = tl.maximum(tl.ceil(n.to(tl.float64) * frac - eps), 0.0).to(tl.int64)
            k = tl.minimum(k, n)
        else:
            k = tl.load(k_ptr + i * ROWS + row)
        idx = tl.sum(((cum < k) & (bins < NV)).to(tl.int32), 0)
        below = tl.sum(tl.where(bins < idx, total, 0), 0)
        tl.store(thr_ptr + i * ROWS + row, lo + idx)
        tl.store(need_ptr + i * ROWS + row, k - below)
        carry = tl.full([], 0, tl.int32)  # a tensor from the start: loop-carried types must not change
        for j in range(n_tiles):  # chunks from the last: ties are taken latest first
            cs = (n_tiles - 1 - j) * CB + chunks
            col = tl.load(hist_ptr + (row * NCH + cs) * NBP + idx, mask=(cs < NCH) & (cs * 0 + idx < NV), other=0)
            tl.store(tb_ptr + (i * ROWS + row) * NCH + cs, tl.cumsum(col, 0, reverse=True) - col + carry, mask=cs < NCH)
            carry += tl.sum(col, 0)


@triton.jit
def chunk_rank(ties, base):
    """Rank from the end (1 = latest) of each tie in a ``[CHUNK]`` tile, after ``base`` later ones."""
    return base + tl.cumsum(ties.to(tl.int32), 0, reverse=True)


@triton.jit
def dense_select_kernel(
    dist_ptr, code_ptr, csb, csh, cst, css, thr_ptr, need_ptr, tb_ptr, out_ptr, H, T, S, NCH, ROWS,
    TIERS: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Selection (``TIERS`` False: bool ``out [rows, S]`` of :func:`~dashkv.ops.reference.select_smallest`
    with threshold set 0) or tiers (int8, :func:`~dashkv.ops.reference.assign_tiers` with threshold sets
    0 = high, 1 = high + mid) of given distances; mask codes 0 hidden, 1 eligible, 2 always high.
    Grid: ``(rows, NCH)``."""
    row, c, offs, inb, d, code = chunk_of_row(dist_ptr, code_ptr, csb, csh, cst, css, H, T, S, CHUNK)
    elig = inb & (code == 1)
    thr = tl.load(thr_ptr + row)
    need = tl.load(need_ptr + row)
    first = selected(d, elig, thr, need, chunk_rank(elig & (d == thr), tl.load(tb_ptr + row * NCH + c)))
    if TIERS:
        thr2 = tl.load(thr_ptr + ROWS + row)
        need2 = tl.load(need_ptr + ROWS + row)
        base2 = tl.load(tb_ptr + (ROWS + row) * NCH + c)
        both = selected(d, elig, thr2, need2, chunk_rank(elig & (d == thr2), base2))
        high = first | (code == 2)
        tiers = tl.where(code == 0, -1, tl.where(high, 2, tl.where(both, 1, 0)))
        tl.store(out_ptr + row * S + offs, tiers.to(tl.int8), mask=inb)
    else:
        tl.store(out_ptr + row * S + offs, first.to(tl.int8), mask=inb)


@triton.jit
def calibrate_kernel(
    dist_ptr, code_ptr, csb, csh, cst, css, thr_ptr, need_ptr, tb_ptr,
    prior_ptr, count_ptr, ratio, off_ptr, hist_ptr,
    HS, T, S, NCH, min_votes, step_s, step_t, lo,
    VOTES: tl.constexpr, TEMPORAL: tl.constexpr, CHUNK: tl.constexpr, NBP: tl.constexpr,
):  # fmt: skip
    """Consensus and momentum (:mod:`dashkv.calibration`) without dense masks: per key, the selection
    rows (``HS`` query heads or groups) whose ``k_high`` smallest raw distances contain it (thresholds
    of the raw histograms); the offset ``off [B*T, S] = step_s [votes >= min_votes] + step_t
    [prior * visible count >= ratio and visible]``; then per (row, chunk) histograms of the calibrated
    distances ``raw + off`` (bin = distance - lo) into ``hist``. Grid: ``(B * T, NCH)``."""
    bt = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    b = bt // T
    t = bt % T
    offs = c * CHUNK + tl.arange(0, CHUNK)
    inb = offs < S
    off = tl.zeros([CHUNK], tl.int32)
    if VOTES:
        votes = tl.zeros([CHUNK], tl.int32)
        for h in range(HS):
            srow = (b * HS + h) * T + t
            d = tl.load(dist_ptr + srow * S + offs, mask=inb, other=0).to(tl.int32)
            code = tl.load(code_ptr + b * csb + h * csh + t * cst + offs * css, mask=inb, other=0)
            elig = inb & (code == 1)
            thr = tl.load(thr_ptr + srow)
            rank = chunk_rank(elig & (d == thr), tl.load(tb_ptr + srow * NCH + c))
            votes += selected(d, elig, thr, tl.load(need_ptr + srow), rank).to(tl.int32)
        off += tl.where(votes >= min_votes, step_s, 0)
    if TEMPORAL:
        prior = tl.load(prior_ptr + bt * S + offs, mask=inb, other=0.0)
        visible = tl.load(code_ptr + b * csb + t * cst + offs * css, mask=inb, other=0) != 0
        count = tl.load(count_ptr + bt)
        off += tl.where((prior * count >= ratio) & visible, step_t, 0)
    tl.store(off_ptr + bt * S + offs, off.to(off_ptr.dtype.element_ty), mask=inb)
    for h in range(HS):
        srow = (b * HS + h) * T + t
        d = tl.load(dist_ptr + srow * S + offs, mask=inb, other=0).to(tl.int32) + off - lo
        code = tl.load(code_ptr + b * csb + h * csh + t * cst + offs * css, mask=inb, other=0)
        keep = inb & (code == 1)
        counts = tl.histogram(tl.where(keep, d, 0), NBP, mask=keep)
        tl.store(hist_ptr + (srow * NCH + c) * NBP + tl.arange(0, NBP), counts)
