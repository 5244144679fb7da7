"""Split-softmax (flash-decoding) attention over given tiers: per (row, chunk) partials, then a merge.

Each (row, chunk) keeps ``max``, ``sum exp`` and an unnormalised ``sum exp * v`` in fp32, separately
for high and mid keys, because the mid logits move by the row's anchor offset (mean ``exact -
estimate`` over its high keys), known only after all chunks. K rows are read for high keys only and V
rows for high and mid keys only (gathered by index, prefetched :data:`AHEAD` keys ahead); code-based
estimates are computed only at mid keys and, for the anchor, at high keys.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from dashkv.ops.cpu.jit import AHEAD, FASTMATH, JIT, PJIT, expf, load_f32, popcount, prefetch, prefetch_l2, task_span
from dashkv.ops.reference import HIGH, MID


@njit(fastmath=FASTMATH, inline="always", **JIT)
def _word_residual(th, j0, x):
    """Bit weights of the set bits of word ``x``: 8 byte-table lookups (``th[j0:j0 + 8]``), summed as a
    tree so that the lookups of one key do not wait on each other's adds."""
    m = np.uint64(255)
    a = th[j0, np.uintp(x & m)] + th[j0 + 1, np.uintp((x >> np.uint64(8)) & m)]
    b = th[j0 + 2, np.uintp((x >> np.uint64(16)) & m)] + th[j0 + 3, np.uintp((x >> np.uint64(24)) & m)]
    c = th[j0 + 4, np.uintp((x >> np.uint64(32)) & m)] + th[j0 + 5, np.uintp((x >> np.uint64(40)) & m)]
    d = th[j0 + 6, np.uintp((x >> np.uint64(48)) & m)] + th[j0 + 7, np.uintp(x >> np.uint64(56))]
    return (a + b) + (c + d)


@njit(fastmath=FASTMATH, **JIT)
def estimates(
    lo, hi, idx, dd, kbase, h, q0, q1, kc, a_row, qdc_row, knorm, bias, tab, sumphi, costab, bits, scaling, out,
    vals,
):  # fmt: skip
    """Mid-tier logits of keys ``idx[lo:hi]`` (distances ``dd``) into ``out[lo:hi]``; see
    :func:`dashkv.ops.reference.mid_tier_logits`: the angle estimate from the distance plus the
    residual ``sum phi - 2 sum_{q_r != k_r} phi_r``, from byte tables of the bit weights over ``q ^ k``.
    One call per (row, chunk): per-key calls with array arguments would cost more than the work.
    Prefetches the V rows of those keys (``vals``; a 1-row dummy skips it), so that the softmax's
    gather finds them in cache: the estimate is compute work that hides their latency."""
    line = 64 // vals.itemsize
    dim = vals.shape[1] if vals.shape[0] > 1 else 0
    bias_h = bias[h]
    sum_h = sumphi[h]
    th = tab[h]
    two_words = kc.shape[1] > 1
    for i in range(lo, hi):
        ui = np.uintp(i)
        if i + AHEAD < hi:
            for j in range(0, dim, line):
                prefetch_l2(vals, kbase + idx[np.uintp(i + AHEAD)], j)
        krow = np.uintp(kbase + idx[ui])
        d = dd[ui]
        if 0 <= d <= bits:
            cos = costab[d]
        else:
            cos = np.float32(math.cos(np.float32(math.pi) * np.float32(d) / np.float32(bits)))
        logit = (qdc_row + a_row * knorm[krow] * cos) * scaling + bias_h
        res = _word_residual(th, 0, np.uint64(q0 ^ kc[krow, 0]))
        if two_words:
            res += _word_residual(th, 8, np.uint64(q1 ^ kc[krow, 1]))
        out[ui] = logit + (sum_h - np.float32(2.0) * res)


@njit(fastmath=FASTMATH, inline="always", **JIT)
def exp_weights(logit, lo, hi):
    """``(max, sum exp)`` of ``logit[lo:hi]`` (``hi > lo``), each logit replaced by ``exp(logit - max)``."""
    m = logit[lo]
    for i in range(lo + 1, hi):  # vectorised (unsigned indices: no wraparound checks)
        m = max(m, logit[np.uintp(i)])
    total = np.float32(0.0)
    for i in range(lo, hi):
        e = expf(logit[np.uintp(i)] - m)
        logit[np.uintp(i)] = e
        total += e
    return m, total


@njit(fastmath=FASTMATH, **JIT)
def softmax_part(logit, lo, hi, idx, vals, half, kbase, acc, probs, row, want_probs):
    """``(max, sum exp)`` of ``logit[lo:hi]`` and ``acc = sum exp * v`` (V rows of those keys only)."""
    dim = acc.shape[0]
    for j in range(dim):
        acc[j] = 0.0
    if hi <= lo:
        return np.float32(-np.inf), 0.0
    line = 64 // vals.itemsize
    for i in range(lo, min(hi, lo + AHEAD)):
        for j in range(0, dim, line):
            prefetch(vals, kbase + idx[i], j)
    m, total = exp_weights(logit, lo, hi)
    i = lo
    while i + 4 <= hi:  # four rows a pass: acc is read and written once for four keys
        for k in range(i + AHEAD, min(hi, i + AHEAD + 4)):
            for j in range(0, dim, line):
                prefetch(vals, kbase + idx[np.uintp(k)], j)
        ui = np.uintp(i)
        e0, e1, e2, e3 = logit[ui], logit[ui + 1], logit[ui + 2], logit[ui + 3]
        r0, r1 = np.uintp(kbase + idx[ui]), np.uintp(kbase + idx[ui + 1])
        r2, r3 = np.uintp(kbase + idx[ui + 2]), np.uintp(kbase + idx[ui + 3])
        for j in range(dim):
            acc[j] += (e0 * load_f32(vals[r0, j], half) + e1 * load_f32(vals[r1, j], half)) + (
                e2 * load_f32(vals[r2, j], half) + e3 * load_f32(vals[r3, j], half)
            )
        i += 4
    for i in range(i, hi):
        e = logit[np.uintp(i)]
        vrow = np.uintp(kbase + idx[np.uintp(i)])
        for j in range(dim):
            acc[j] += e * load_f32(vals[vrow, j], half)
    if want_probs:
        for i in range(lo, hi):
            probs[np.uintp(row), np.uintp(idx[np.uintp(i)])] = logit[np.uintp(i)]
    return m, np.float64(total)


@njit(fastmath=FASTMATH, **JIT)
def attend_chunk(
    q, row, rows, mid, kbase, scaling, idx, nh, nm, dd, logit, est, h, q0, q1, a_row, qdc_row,
    part_m, part_l, part_acc, probs, want_probs,
):  # fmt: skip
    """Split softmax of one (row, chunk): ``idx[:nh]`` high keys, ``idx[nh:nh + nm]`` mid keys, ``dd``
    their raw distances, ``rows`` the layer's :class:`~dashkv.ops.cpu.views.KeyRows` (head of this
    chunk from ``kbase``), ``mid`` the :class:`~dashkv.ops.cpu.step.MidTier`; query head ``h``, its
    code words ``q0, q1`` and its mid-tier scalars ``a_row = temperature |q|``, ``qdc_row = q . mu``.
    High logits read K rows of high keys only; the weighted sums read V rows of selected keys only.
    High and mid keep separate partials (``part_*[0]`` and ``[1]``) because the anchor offset of the
    mid logits is known only once all chunks are done. Returns the chunk's sum of ``exact -
    estimate`` over its high keys (the anchor's numerator; 0 without the mid tier)."""
    keys, vals, half = rows.keys, rows.values, rows.half
    dim = q.shape[1]
    line = 64 // keys.itemsize
    args = (idx, dd, kbase, h, q0, q1, rows.codes, a_row, qdc_row, rows.norms, mid.bias, mid.tables, mid.phi_sum,
            mid.cosines, mid.bits, scaling)  # fmt: skip
    if mid.on:  # the estimates first: their arithmetic hides the fetch of the high keys' K rows
        for i in range(nh):
            for j in range(0, dim, line):
                prefetch_l2(keys, kbase + idx[np.uintp(i)], j)
        estimates(0, nh, *args, est, vals[:1])
        estimates(nh, nh + nm, *args, logit, vals)
    for i in range(min(nh, AHEAD)):
        for j in range(0, dim, line):
            prefetch(keys, kbase + idx[i], j)
    for i in range(nh):  # exact logits; the V rows of the same keys are fetched meanwhile
        ui = np.uintp(i)
        if i + AHEAD < nh:
            for j in range(0, dim, line):
                prefetch(keys, kbase + idx[np.uintp(i + AHEAD)], j)
        for j in range(0, dim, line):
            prefetch_l2(vals, kbase + idx[ui], j)
        krow = np.uintp(kbase + idx[ui])
        dot = np.float32(0.0)
        for j in range(dim):
            dot += q[row, j] * load_f32(keys[krow, j], half)
        logit[ui] = dot * scaling
    gap = 0.0
    if mid.on:
        for i in range(nh):
            gap += np.float64(logit[i] - est[i])
    for part, lo, hi in ((0, 0, nh), (1, nh, nh + nm)):
        part_m[part], part_l[part] = softmax_part(
            logit, lo, hi, idx, vals, half, kbase, part_acc[part], probs, row, want_probs
        )
    return gap


@njit(fastmath=FASTMATH, **JIT)
def attend_shared(
    q, qc, b, kvh, t, heads, tokens, rows, mid, kbase, scaling, idx, nh, nm, dd, logit, est, c,
    m_part, l_part, acc_part, gap_part,
):  # fmt: skip
    """:func:`attend_chunk` for every query head of KV head ``kvh`` (token ``t``) over one selection the
    group shares (``share="group"`` / ``"union"``): ``idx[:nh]`` high keys, ``idx[nh:nh + nm]`` mid.
    Each K row is read once for the group's logits and each V row once for all of its sums, while it
    is in L1; per head, the loop of :func:`attend_chunk` read them once per query head (from memory
    where a chunk's selected rows do not stay in L2: Gemma-3-270M's head dim 256).

    ``dd``, ``logit``, ``est``: ``[groups, >= nh + nm]`` scratch; after the call ``logit[g, i]`` holds
    head ``g``'s unnormalised weight of key ``idx[i]`` (as :func:`attend_chunk` leaves its ``logit``)."""
    keys, vals, half, kc = rows.keys, rows.values, rows.half, rows.codes
    dim = q.shape[1]
    kheads = rows.kv_heads
    groups = heads // kheads
    words = qc.shape[3]
    line = 64 // keys.itemsize
    n = nh + nm
    row0 = (b * heads + kvh * groups) * tokens + t  # head g's row: row0 + g * tokens
    for i in range(min(nh, AHEAD)):
        for j in range(0, dim, line):
            prefetch(keys, kbase + idx[i], j)
    if mid.on:  # estimates first: their arithmetic hides the fetch of the high keys' K rows
        for g in range(groups):
            h = kvh * groups + g
            row = row0 + g * tokens
            q0 = qc[b, h, t, 0]
            q1 = qc[b, h, t, 1] if words > 1 else np.int64(0)
            ddg = dd[g]
            for i in range(n):  # this head's own raw distances of the shared selection
                krow = np.uintp(kbase + idx[np.uintp(i)])
                d = popcount(q0 ^ kc[krow, 0])
                if words > 1:
                    d += popcount(q1 ^ kc[krow, 1])
                ddg[np.uintp(i)] = d
            a_row = mid.temperature[h] * mid.query_norm[row]
            qdc_row = mid.query_dot_center[row]
            args = (idx, ddg, kbase, h, q0, q1, kc, a_row, qdc_row, rows.norms, mid.bias, mid.tables, mid.phi_sum,
                    mid.cosines, mid.bits, scaling)  # fmt: skip
            ahead = vals if g == 0 else vals[:1]  # the V rows of the mid keys prefetched once
            estimates(0, nh, *args, est[g], vals[:1])
            estimates(nh, n, *args, logit[g], ahead)
    for i in range(nh):  # exact logits of every head from each K row while it is in L1
        ui = np.uintp(i)
        if i + AHEAD < nh:
            for j in range(0, dim, line):
                prefetch(keys, kbase + idx[np.uintp(i + AHEAD)], j)
        krow = np.uintp(kbase + idx[ui])
        for g in range(groups):
            r = np.uintp(row0 + g * tokens)
            dot = np.float32(0.0)
            for j in range(dim):
                dot += q[r, j] * load_f32(keys[krow, j], half)
            logit[g, ui] = dot * scaling
    for g in range(groups):
        row = np.uintp(row0 + g * tokens)
        gap = 0.0
        if mid.on:
            for i in range(nh):
                gap += np.float64(logit[g, np.uintp(i)] - est[g, np.uintp(i)])
        gap_part[row, c] = gap
        for part, lo, hi in ((0, 0, nh), (1, nh, n)):
            acc = acc_part[row, c, part]
            for j in range(dim):
                acc[j] = 0.0
            if hi <= lo:
                m_part[row, c, part] = -np.inf
                l_part[row, c, part] = 0.0
                continue
            top, total = exp_weights(logit[g], lo, hi)
            m_part[row, c, part] = top
            l_part[row, c, part] = np.float64(total)
    for part, lo, hi in ((0, 0, nh), (1, nh, n)):  # weighted sums: each V row read once for the group
        for i in range(lo, min(hi, lo + AHEAD)):
            for j in range(0, dim, line):
                prefetch(vals, kbase + idx[np.uintp(i)], j)
        i = lo
        while i + 2 <= hi:
            for k in range(i + AHEAD, min(hi, i + AHEAD + 2)):
                for j in range(0, dim, line):
                    prefetch(vals, kbase + idx[np.uintp(k)], j)
            ui = np.uintp(i)
            v0, v1 = np.uintp(kbase + idx[ui]), np.uintp(kbase + idx[ui + 1])
            for g in range(groups):
                e0, e1 = logit[g, ui], logit[g, ui + 1]
                acc = acc_part[np.uintp(row0 + g * tokens), c, part]
                for j in range(dim):
                    acc[j] += e0 * load_f32(vals[v0, j], half) + e1 * load_f32(vals[v1, j], half)
            i += 2
        if i < hi:
            v0 = np.uintp(kbase + idx[np.uintp(i)])
            for g in range(groups):
                e0 = logit[g, np.uintp(i)]
                acc = acc_part[np.uintp(row0 + g * tokens), c, part]
                for j in range(dim):
                    acc[j] += e0 * load_f32(vals[v0, j], half)


@njit(**JIT)
def merge_kernel(m_part, l_part, acc_part, gap_part, nhigh_part, mid_on, out, factor):
    """Combine chunk partials (in float64) into ``out`` (float32). Mid logits move by the anchor offset
    (mean ``exact - estimate`` over the row's high keys; 0 without high keys); ``factor[row, c, tier] =
    weight of that partial / L``."""
    rows, nch = m_part.shape[0], m_part.shape[1]
    dim = out.shape[1]
    row_sum = np.empty(dim, np.float64)
    for r in range(rows):
        off = 0.0
        if mid_on:
            gap = 0.0
            count = 0
            for c in range(nch):
                gap += gap_part[r, c]
                count += nhigh_part[r, c]
            off = np.float64(np.float32(gap) / np.float32(max(count, 1)))
        top = -np.inf
        for c in range(nch):
            top = max(top, np.float64(m_part[r, c, 0]), np.float64(m_part[r, c, 1]) + off)
        if top == -np.inf:  # nothing selected: softmax of all -inf is NaN, as in torch
            for j in range(dim):
                out[r, j] = np.nan
            for c in range(nch):
                factor[r, c, 0] = factor[r, c, 1] = np.nan
            continue
        total = 0.0
        for c in range(nch):
            w0 = math.exp(np.float64(m_part[r, c, 0]) - top)
            w1 = math.exp(np.float64(m_part[r, c, 1]) + off - top)
            factor[r, c, 0] = w0
            factor[r, c, 1] = w1
            total += l_part[r, c, 0] * w0 + l_part[r, c, 1] * w1
        row_sum[:] = 0.0
        for c in range(nch):
            for k in range(2):
                w = factor[r, c, k] / total
                factor[r, c, k] = w
                if w != 0.0:
                    for j in range(dim):
                        row_sum[j] += acc_part[r, c, k, j] * w
        for j in range(dim):
            out[r, j] = row_sum[j]
    return out


@njit(**PJIT)
def scale_probs(probs, tiers, factor, chunk):
    """Normalise the chunks' unnormalised weights: ``probs[r, s] *= factor[r, chunk of s, tier]``
    (unsigned indices, so that the loop vectorises: 4x faster at 32K keys)."""
    rows, seq = probs.shape
    nch = factor.shape[1]
    for task in prange(rows * nch):
        r = np.uintp(task // nch)
        c = task % nch
        f_high = np.float32(factor[r, c, 0])
        f_mid = np.float32(factor[r, c, 1])
        for s in range(c * chunk, min(seq, (c + 1) * chunk)):
            us = np.uintp(s)
            probs[r, us] *= f_mid if tiers[r, us] == MID else f_high
    return probs


@njit(fastmath=FASTMATH, **PJIT)
def attn_tiers_kernel(q, rows, tiers, scaling, mid, mdist, qcodes, parts, probs, want_probs, chunk):
    """Split-softmax attention over given tiers ``[B*H*T, S]``: ``q [B*H*T, D]`` fp32, ``rows`` the
    layer's :class:`~dashkv.ops.cpu.views.KeyRows`, ``mid`` the :class:`~dashkv.ops.cpu.step.MidTier`
    with ``|q|`` and ``q . mu`` per row given, ``mdist [B*H*T, S]`` and ``qcodes [B, H, T, W]`` for its
    estimates. Writes ``parts.m / l / acc / gap / nhigh`` (:class:`~dashkv.ops.cpu.step.Partials`) and,
    where ``want_probs``, each selected key's unnormalised weight into ``probs``."""
    nbatch, heads, tokens = qcodes.shape[0], qcodes.shape[1], qcodes.shape[2]
    kheads, seq, kstride = rows.kv_heads, rows.length, rows.stride
    # written arrays as locals: numba loses a prange body's writes through a tuple's attribute
    m_part, l_part, acc_part, gap_part, nhigh_part = parts.m, parts.l, parts.acc, parts.gap, parts.nhigh
    kbatch = rows.keys.shape[0] // (kheads * kstride)
    groups = heads // kheads
    nch = (seq + chunk - 1) // chunk
    for task in prange(nbatch * kheads * nch):
        b, kvh, c, kbase, s0, s1 = task_span(task, nch, kheads, kbatch, seq, chunk, kstride)
        idx = np.empty(s1 - s0, np.int64)
        idm = np.empty(s1 - s0, np.int64)
        dd = np.empty(s1 - s0, np.int64)
        logit = np.empty(s1 - s0, np.float32)
        est = np.empty(s1 - s0, np.float32)
        for g in range(groups):
            h = kvh * groups + g
            for t in range(tokens):
                row = (b * heads + h) * tokens + t
                nh = 0
                nm = 0
                for s in range(s0, s1):  # branch-free compaction of high and mid positions
                    tier = tiers[row, s]
                    idx[nh] = s
                    nh += np.int64(tier == HIGH)
                    idm[nm] = s
                    nm += np.int64(mid.on & (tier == MID))
                for i in range(nm):
                    idx[nh + i] = idm[i]
                a_row = qdc_row = np.float32(0.0)
                q0 = q1 = np.int64(0)
                if mid.on:
                    for i in range(nh + nm):
                        dd[i] = mdist[row, idx[i]]
                    a_row = mid.temperature[h] * mid.query_norm[row]
                    qdc_row = mid.query_dot_center[row]
                    q0 = qcodes[b, h, t, 0]
                    q1 = qcodes[b, h, t, 1] if qcodes.shape[3] > 1 else np.int64(0)
                if want_probs:
                    for s in range(s0, s1):
                        probs[row, s] = 0.0
                gap_part[row, c] = attend_chunk(
                    q, row, rows, mid, kbase, scaling, idx, nh, nm, dd, logit, est, h, q0, q1, a_row, qdc_row,
                    m_part[row, c], l_part[row, c], acc_part[row, c], probs, want_probs,
                )  # fmt: skip
                nhigh_part[row, c] = nh
