"""Distances, histograms and exact, sort-free selection: the integer kernels of the CPU backend.

Distances are small integers, so each row's threshold (the reference's ``kth_smallest``) comes from
per-(row, chunk) histograms; per-chunk counts of the keys tied at the threshold give every chunk its
starting tie rank, so chunks break their ties (later positions first) independently, in parallel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from dashkv.ops.cpu.jit import JIT, PJIT, mask_row, popcount, task_span
from dashkv.ops.reference import HIDDEN, HIGH, LOW, MID


@njit(**JIT)
def take_tie(count, need, tied):
    """The tie rule of every selection (the reference's ``select_smallest``): a row walked from its
    latest key back takes the keys tied at its threshold while it still ``need``s keys. ``count``:
    ties met so far in this walk (a chunk starts from the ties of the later chunks, see
    :func:`thresholds`). Returns the new count and whether this key is taken."""
    count += np.int64(tied)
    return count, tied and count <= need


@njit(**JIT)
def thresholds(hist, kvals, lo, bins):
    """Per row threshold (``kth_smallest``), ties still needed, and ties in later chunks.

    ``hist[row, chunk]`` has ``bins + 4`` slots (``bins = hi - lo + 1``): ``0`` raw ``< lo``; ``1 + j``
    raw ``== lo + j`` for ``j`` in ``[0, bins]`` (``j = bins``: ``hi + 1``); ``bins + 2`` raw ``> hi +
    1``; ``bins + 3`` not eligible. The reference clamps distances into ``[lo, hi]`` for the histogram but compares raw
    values when selecting; the extra bins reproduce that exactly for out-of-range distances.
    """
    rows, nch, slots = hist.shape
    thr = np.empty(rows, np.int64)
    need = np.empty(rows, np.int64)
    tie_base = np.empty((rows, nch), np.int64)
    tot = np.empty(slots, np.int64)
    for r in range(rows):
        tot[:] = 0
        for c in range(nch):
            for j in range(slots):
                tot[j] += hist[r, c, j]
        k = kvals[r]
        cum = 0
        cnt = 0
        for j in range(bins):  # the reference's clamped histogram and its cumsum
            cj = tot[j + 1]
            if j == 0:
                cj += tot[0]
            if j == bins - 1:
                cj += tot[bins + 1] + tot[bins + 2]
            cum += cj
            if cum < k:
                cnt += 1
        below = tot[0]
        for j in range(cnt):
            below += tot[1 + j]
        thr[r] = lo + cnt
        need[r] = k - below
        acc = 0
        for c in range(nch - 1, -1, -1):
            tie_base[r, c] = acc
            acc += hist[r, c, cnt + 1]
    return thr, need, tie_base


@njit(**JIT)
def hamming_row(qc, b, h, t, kc, kbase, s0, s1, out, row, nearest):
    """Hamming distances of query code ``qc[b, h, t]`` to key codes ``kc[kbase + s0 : kbase + s1]`` into
    ``out[row, s0:s1]`` (where ``nearest``, the smaller of it and what ``out`` holds: a key's distance to
    the nearest of several queries). One loop per word count and mode, so that each vectorises
    (``vpopcntq`` where the CPU has it); ``out`` is passed whole: a row slice would be typed as a
    non-contiguous array and the loops would not vectorise.

    Hot loops here index with ``np.uintp``: numba wraps negative signed indices around, and that
    check alone keeps LLVM from vectorising a loop (4-5x slower)."""
    words = kc.shape[1]
    q0 = qc[b, h, t, 0]
    r = np.uintp(row)
    if words == 1 and not nearest:
        for s in range(s0, s1):
            out[r, np.uintp(s)] = popcount(q0 ^ kc[np.uintp(kbase + s), 0])
    elif words == 1:
        for s in range(s0, s1):
            u = np.uintp(s)
            out[r, u] = min(out[r, u], popcount(q0 ^ kc[np.uintp(kbase + s), 0]))
    elif words == 2 and not nearest:
        q1 = qc[b, h, t, 1]
        for s in range(s0, s1):
            k = np.uintp(kbase + s)
            out[r, np.uintp(s)] = popcount(q0 ^ kc[k, 0]) + popcount(q1 ^ kc[k, 1])
    elif words == 2:
        q1 = qc[b, h, t, 1]
        for s in range(s0, s1):
            k, u = np.uintp(kbase + s), np.uintp(s)
            out[r, u] = min(out[r, u], popcount(q0 ^ kc[k, 0]) + popcount(q1 ^ kc[k, 1]))
    else:
        for s in range(s0, s1):
            acc = 0
            for w in range(words):
                acc += popcount(qc[b, h, t, w] ^ kc[np.uintp(kbase + s), w])
            out[r, np.uintp(s)] = min(out[r, np.uintp(s)], acc) if nearest else acc


@njit(**PJIT)
def hamming_kernel(qc, kc, kheads, kstride, out, chunk):
    """``qc [B, H, T, W]``, ``kc [Bk * Hkv * S, W]`` -> ``out [B * H * T, S]`` int32."""
    nbatch, heads, tokens, words = qc.shape
    seq = out.shape[1]
    kbatch = kc.shape[0] // (kheads * kstride)
    groups = heads // kheads
    nch = (seq + chunk - 1) // chunk
    for task in prange(nbatch * kheads * nch):
        b, kvh, c, kbase, s0, s1 = task_span(task, nch, kheads, kbatch, seq, chunk, kstride)
        for g in range(groups):
            h = kvh * groups + g
            for t in range(tokens):
                hamming_row(qc, b, h, t, kc, kbase, s0, s1, out, (b * heads + h) * tokens + t, False)
    return out


@njit(**PJIT)
def block_distance_kernel(qc, kc, kheads, kstride, block, out):
    """``qc [B, H, T, W]``, ``kc [Bk * Hkv * S, W]`` -> ``out [B * Hkv * blocks, S]`` int32: per (batch,
    KV head, query block), the smallest distance of each key to the block's rows of the GQA group."""
    nbatch, heads, tokens, words = qc.shape
    seq = out.shape[1]
    kbatch = kc.shape[0] // (kheads * kstride)
    groups = heads // kheads
    blocks = (tokens + block - 1) // block
    for task in prange(nbatch * kheads * blocks):
        b, kvh, j, kbase, _, _ = task_span(task, blocks, kheads, kbatch, seq, seq, kstride)
        for s in range(seq):
            out[np.uintp(task), np.uintp(s)] = 64 * words + 1
        for g in range(groups):
            for t in range(j * block, min(tokens, (j + 1) * block)):
                hamming_row(qc, b, kvh * groups + g, t, kc, kbase, 0, seq, out, task, True)
    return out


@njit(**JIT)
def row_chunk(task, nch, seq, chunk, vdims):
    """``(row, chunk, mask row, s0, s1)`` of task number ``task`` of the per-op kernels below, whose
    tasks are (distance row, chunk) pairs, chunk fastest."""
    r = task // nch
    c = task % nch
    s0 = c * chunk
    return r, c, mask_row(r, vdims), s0, min(seq, s0 + chunk)


@njit(**PJIT)
def hist_kernel(dist, vis, vdims, lo, bins, chunk):
    """Per (row, chunk) histogram of the distances of eligible keys (``vis == 1``); slot layout: see
    :func:`thresholds`."""
    rows, seq = dist.shape
    nch = (seq + chunk - 1) // chunk
    slots = bins + 4
    trash = bins + 3
    hist = np.zeros((rows, nch, slots), np.int64)
    for task in prange(rows * nch):
        r, c, vr, s0, s1 = row_chunk(task, nch, seq, chunk, vdims)
        loc = np.zeros(4 * slots, np.int64)  # 4 interleaved copies break store-to-load chains
        for s in range(s0, s1):
            j = min(max(np.int64(dist[r, s]) - lo + 1, 0), bins + 2) if vis[vr, s] == 1 else trash
            loc[(s & 3) * slots + j] += 1
        for j in range(slots):
            hist[r, c, j] = loc[j] + loc[slots + j] + loc[2 * slots + j] + loc[3 * slots + j]
    return hist


@njit(**PJIT)
def select_kernel(dist, vis, vdims, thr, need, tie_base, out, chunk):
    """Eligible keys below the threshold, and ties at it while the row still needs keys (latest first)."""
    rows, seq = dist.shape
    nch = (seq + chunk - 1) // chunk
    for task in prange(rows * nch):
        r, c, vr, s0, s1 = row_chunk(task, nch, seq, chunk, vdims)
        t = thr[r]
        nd = need[r]
        cnt = tie_base[r, c]
        for s in range(s1 - 1, s0 - 1, -1):
            d = np.int64(dist[r, s])
            elig = vis[vr, s] == 1
            cnt, tie = take_tie(cnt, nd, elig and d == t)
            out[r, s] = (elig and d < t) or tie
    return out


@njit(**PJIT)
def tiers_kernel(dist, vis, vdims, th_h, nd_h, tb_h, th_m, nd_m, tb_m, out, chunk):
    """Tiers from the two thresholds; ``vis``: 0 hidden, 1 eligible, 2 always high."""
    rows, seq = dist.shape
    nch = (seq + chunk - 1) // chunk
    for task in prange(rows * nch):
        r, c, vr, s0, s1 = row_chunk(task, nch, seq, chunk, vdims)
        th = th_h[r]
        tm = th_m[r]
        ndh = nd_h[r]
        ndm = nd_m[r]
        cnt_h = tb_h[r, c]
        cnt_m = tb_m[r, c]
        for s in range(s1 - 1, s0 - 1, -1):
            k = vis[vr, s]
            d = np.int64(dist[r, s])
            # branch-free for most keys; only eligible ties at a threshold take the ordered path
            tier = HIGH if d < th else (MID if d < tm else LOW)
            tier = tier if k == 1 else (HIGH if k == 2 else HIDDEN)
            if k == 1 and (d == th or d == tm):
                cnt_m, mid_tie = take_tie(cnt_m, ndm, d == tm)
                cnt_h, high_tie = take_tie(cnt_h, ndh, d == th)
                tier = HIGH if d < th or high_tie else (MID if d < tm or mid_tie else LOW)
            out[r, s] = tier
    return out
