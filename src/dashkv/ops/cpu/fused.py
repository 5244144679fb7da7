"""The passes of the fused decode step: distances, calibration, tiers and attention without dense
``[B, H, T, S]`` intermediates (run in order by :func:`dashkv.ops.cpu.step.step_kernel`).

The passes take the step's arrays as named tuples (:class:`~dashkv.ops.cpu.views.KeyRows`,
:class:`~dashkv.ops.cpu.views.MaskRows`, :class:`~dashkv.ops.cpu.step.MidTier`, ...); ``vis`` is a
mask's visibility bytes (0 hidden, 1 eligible, 2 always high), ``qc`` / ``kc`` are hash codes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from dashkv.ops.cpu.attend import attend_chunk, attend_shared
from dashkv.ops.cpu.jit import FASTMATH, JIT, PJIT, compress16, mask_row, task_span
from dashkv.ops.cpu.select import hamming_row, take_tie
from dashkv.ops.reference import HIDDEN, HIGH, LOW, MID


@njit(**JIT)
def _count(slot, loc, slots):
    """Histogram of the slot numbers ``slot`` into ``loc[:slots]``, through 4 interleaved copies
    (``loc[4 * slots]``) that break the store-to-load chains of repeated slots."""
    loc[:] = 0
    n = slot.shape[0]
    n4 = n - n % 4
    for i in range(0, n4, 4):
        loc[np.uintp(slot[i])] += 1
        loc[np.uintp(slots + slot[i + 1])] += 1
        loc[np.uintp(2 * slots + slot[i + 2])] += 1
        loc[np.uintp(3 * slots + slot[i + 3])] += 1
    for i in range(n4, n):
        loc[np.uintp(slot[i])] += 1


@njit(**PJIT)
def distance_kernel(qc, rows, masks, bins, dist, hist, chunk, group):
    """Raw Hamming distances of every query row into ``dist [B*H*T, S]`` (one byte a key where ``64 W <
    255``) and per (row, chunk) histograms of the eligible keys, bins of :func:`thresholds` with ``lo =
    0``. One task is a (batch, KV head, chunk): the chunk's codes are read from memory once for the
    whole GQA group. ``group``: rows are (batch, KV head, token) and hold each key's distance to the
    nearest of the group's query heads (``dist [B*Hkv*T, S]``)."""
    nbatch, heads, tokens, words = qc.shape
    kc, vis, vdims = rows.codes, masks.vis, masks.dims
    kheads, seq, kstride = rows.kv_heads, rows.length, rows.stride
    kbatch = kc.shape[0] // (kheads * kstride)
    groups = heads // kheads
    nch = (seq + chunk - 1) // chunk
    slots = bins + 4
    trash = bins + 3
    for task in prange(nbatch * kheads * nch):
        b, kvh, c, kbase, s0, s1 = task_span(task, nch, kheads, kbatch, seq, chunk, kstride)
        loc = np.zeros(4 * slots, np.int32)  # 4 interleaved copies break store-to-load chains
        slot = np.empty(s1 - s0, np.int32)  # each key's histogram slot
        for g in range(1 if group else groups):
            h = kvh * groups + g
            for t in range(tokens):
                row = (b * kheads + kvh) * tokens + t if group else (b * heads + h) * tokens + t
                mr = mask_row(row, vdims)
                hamming_row(qc, b, h, t, kc, kbase, s0, s1, dist, row, False)
                for extra in range(1, groups if group else 1):  # the group's other heads: the nearest
                    hamming_row(qc, b, h + extra, t, kc, kbase, s0, s1, dist, row, True)
                r, m = np.uintp(row), np.uintp(mr)
                for i in range(s1 - s0):  # vectorised
                    s = np.uintp(s0 + i)
                    slot[i] = min(np.int32(dist[r, s]) + 1, bins + 2) if vis[m, s] == 1 else trash
                _count(slot, loc, slots)
                for j in range(slots):
                    hist[row, c, j] = loc[j] + loc[slots + j] + loc[2 * slots + j] + loc[3 * slots + j]


@njit(**PJIT)
def calibrate_kernel(dist, masks, heads, tokens, votes_at, min_votes, step_s, temporal, has_temporal, step_t,
                     off, lo, bins, raw_hist, hist, chunk):  # fmt: skip
    """Cross-head consensus and momentum discounts (:mod:`dashkv.calibration`) without dense masks.

    Votes: per key, the heads whose exact selection of ``k_high`` smallest raw distances (``votes_at``:
    thresholds, ties needed and tie bases of the raw histograms ``raw_hist``; ``min_votes == 0`` turns
    consensus off) contains it. Writes the per-key offset ``off[(b, t), s] = step_s [votes >=
    min_votes] + step_t [temporal]`` and per (row, chunk) histograms of the calibrated distances ``raw
    + off`` (bins of :func:`thresholds` with ``lo``). One task is a (batch, token, chunk): votes span
    all heads.

    The calibrated histograms are the raw ones (bins moved by ``-lo``) corrected for the keys with an
    offset (few: voted or with a strong prior), listed once per chunk."""
    vis, vdims = masks.vis, masks.dims
    thr, need, tie_base = votes_at
    rows, seq = dist.shape
    nbatch = rows // (heads * tokens)
    nch = (seq + chunk - 1) // chunk
    raw_slots = raw_hist.shape[2]  # raw distances 0..hi in slots 1..hi+1, not eligible in the last
    enough = min_votes if min_votes > 0 else heads + 1  # consensus off: no key reaches it
    for task in prange(nbatch * tokens * nch):
        c = task % nch
        t = (task // nch) % tokens
        b = task // (nch * tokens)
        s0 = c * chunk
        s1 = min(seq, s0 + chunk)
        orow = b * tokens + t
        votes = np.zeros(s1 - s0, np.int32)
        if min_votes > 0:
            for h in range(heads):
                row = (b * heads + h) * tokens + t
                mr = mask_row(row, vdims)
                th = thr[row]
                nd = need[row]
                cnt = tie_base[row, c]
                r, m = np.uintp(row), np.uintp(mr)
                for i in range(s1 - s0):  # below the threshold (vectorised)
                    s = np.uintp(s0 + i)
                    votes[i] += np.int32((vis[m, s] == 1) & (np.int64(dist[r, s]) < th))
                for s in range(s1 - 1, s0 - 1, -1):  # ties: latest first, as select_smallest
                    if cnt >= nd:
                        break
                    if vis[m, np.uintp(s)] == 1 and np.int64(dist[r, np.uintp(s)]) == th:
                        cnt += 1
                        votes[s - s0] += 1
        trow = np.uintp(orow % temporal.shape[0])
        moved = np.empty(s1 - s0, np.int64)
        n_moved = 0
        for i in range(s1 - s0):
            s = np.uintp(s0 + i)
            o = step_s if votes[i] >= enough else 0
            if has_temporal and temporal[trow, s]:
                o += step_t
            off[np.uintp(orow), s] = o
            moved[np.uintp(n_moved)] = s0 + i  # branch-free list of the keys with an offset
            n_moved += np.int64(o != 0)
        for h in range(heads):
            row = (b * heads + h) * tokens + t
            mr = mask_row(row, vdims)
            r, m, o = np.uintp(row), np.uintp(mr), np.uintp(orow)
            for j in range(bins + 4):
                hist[row, c, j] = 0
            for j in range(1, raw_slots - 3):  # raw d in slot 1 + d; unmoved, it lands in slot 1 + d - lo
                hist[row, c, j - lo] = raw_hist[row, c, j]
            hist[row, c, bins + 3] = raw_hist[row, c, raw_slots - 1]
            for i in range(n_moved):
                s = np.uintp(moved[np.uintp(i)])
                if vis[m, s] == 1:
                    raw = np.int64(dist[r, s])
                    hist[row, c, raw + 1 - lo] -= 1
                    hist[row, c, min(max(raw + off[o, s] - lo + 1, 0), bins + 2)] += 1


@njit(fastmath=FASTMATH, **PJIT)
def attend_kernel(q, qc, rows, masks, dist, off, has_off, tiers_at, group, union, mid, scaling, parts, tiers,
                  want_tiers, chunk):  # fmt: skip
    """Tiers from the thresholds of the (calibrated) distances ``dist + off`` (``tiers_at``: the high
    and the high-or-mid thresholds, ties needed and tie bases), then split-softmax attention over the
    chunk's high and mid keys (:func:`dashkv.ops.cpu.attend.attend_chunk`); the mid estimate reads the
    raw distance. One task is a (batch, KV head, chunk).

    ``group``: ``dist``, the thresholds, the mask rows and ``tiers`` are per (batch, KV head, token)
    (:func:`selection_row`): the group's query heads share one selection, made once. ``union``: every
    head selects on its own rows, and each head attends to the union of the group's selections
    (:func:`_union_chunk`). Both attend with :func:`~dashkv.ops.cpu.attend.attend_shared` (each K and
    V row read once for the group; each head's own raw distances of the selected keys, for the mid
    estimate, recomputed from the codes).

    Writes ``parts`` (:class:`~dashkv.ops.cpu.step.Partials`): each (row, chunk)'s softmax partials,
    high and mid counts, and its selected keys (high first) with their unnormalised weights, read
    back by the merge, the prior and the dense weights."""
    nbatch, heads, tokens, words = qc.shape
    keys = rows.keys
    kheads, seq, kstride = rows.kv_heads, rows.length, rows.stride
    th_h, nd_h, tb_h, th_m, nd_m, tb_m = tiers_at
    # written arrays as locals: numba loses a prange body's writes through a tuple's attribute
    m_part, l_part, acc_part, gap_part = parts.m, parts.l, parts.acc, parts.gap
    nhigh_part, nmid_part, nkept_part, kept_keys, kept_weights = parts.nhigh, parts.nmid, parts.nkept, parts.keys, parts.weights
    kbatch = keys.shape[0] // (kheads * kstride)
    groups = heads // kheads
    nch = (seq + chunk - 1) // chunk
    keep = kept_keys.shape[0] == nbatch * heads * tokens and kept_keys.shape[1] == seq  # for the prior / weights
    for task in prange(nbatch * kheads * nch):
        b, kvh, c, kbase, s0, s1 = task_span(task, nch, kheads, kbatch, seq, chunk, kstride)
        high_f = np.empty(s1 - s0, np.uint8)
        mid_f = np.empty(s1 - s0, np.uint8)
        tie_f = np.empty(s1 - s0, np.uint8)
        idx = np.empty(s1 - s0 + 16, np.int32)  # 16 entries of room: a compress stores 16 lanes
        mids = np.empty(s1 - s0 + 16, np.int32)
        ties = np.empty(s1 - s0 + 16, np.int32)
        dd = np.empty(s1 - s0, np.int64)
        logit = np.empty(s1 - s0, np.float32)
        est = np.empty(s1 - s0, np.float32)
        in_high = np.empty(s1 - s0 if union else 0, np.uint8)
        in_mid = np.empty(s1 - s0 if union else 0, np.uint8)
        shared = group or union  # one selection for the group's heads: attended together
        dds = np.empty((groups if shared else 0, s1 - s0), np.int64)
        logits = np.empty((groups if shared else 0, s1 - s0), np.float32)
        ests = np.empty((groups if shared else 0, s1 - s0), np.float32)
        for t in range(tokens):
            if shared:
                if union:
                    nh, nm, n_mid = _union_chunk(
                        b, kvh, t, groups, kheads, tokens, s0, s1, c, dist, off, has_off, masks, th_h, nd_h, tb_h,
                        th_m, nd_m, tb_m, mid.on, tiers, want_tiers, high_f, mid_f, tie_f, idx, mids, ties, dd, in_high,
                        in_mid,
                    )  # fmt: skip
                else:
                    nh, nm, n_mid = _select_chunk(
                        selection_row(b, kvh, 0, t, kheads, groups, tokens, True), b, t, tokens, s0, s1, c, dist, off,
                        has_off, masks, th_h, nd_h, tb_h, th_m, nd_m, tb_m, mid.on, tiers, want_tiers, high_f, mid_f,
                        tie_f, idx, mids, ties, dd,
                    )  # fmt: skip
                attend_shared(q, qc, b, kvh, t, heads, tokens, rows, mid, kbase, scaling, idx, nh, nm, dds, logits,
                              ests, c, m_part, l_part, acc_part, gap_part)  # fmt: skip
                for g in range(groups):
                    row = (b * heads + kvh * groups + g) * tokens + t
                    _record(row, c, s0, nh, nm, n_mid, idx, logits[g], keep, nhigh_part, nmid_part, nkept_part,
                            kept_keys, kept_weights)  # fmt: skip
                continue
            for g in range(groups):
                h = kvh * groups + g
                row = (b * heads + h) * tokens + t
                q0 = qc[b, h, t, 0]
                q1 = qc[b, h, t, 1] if words > 1 else np.int64(0)
                srow = selection_row(b, kvh, g, t, kheads, groups, tokens, False)
                nh, nm, n_mid = _select_chunk(
                    srow, b, t, tokens, s0, s1, c, dist, off, has_off, masks, th_h, nd_h, tb_h, th_m, nd_m, tb_m,
                    mid.on, tiers, want_tiers, high_f, mid_f, tie_f, idx, mids, ties, dd,
                )  # fmt: skip
                a_row = qdc_row = np.float32(0.0)
                if mid.on:
                    a_row = mid.temperature[h] * mid.query_norm[row]
                    qdc_row = mid.query_dot_center[row]
                gap_part[row, c] = attend_chunk(
                    q, row, rows, mid, kbase, scaling, idx, nh, nm, dd, logit, est, h, q0, q1, a_row, qdc_row,
                    m_part[row, c], l_part[row, c], acc_part[row, c], kept_weights, False,
                )  # fmt: skip
                _record(row, c, s0, nh, nm, n_mid, idx, logit, keep, nhigh_part, nmid_part, nkept_part, kept_keys,
                        kept_weights)  # fmt: skip


@njit(inline="always", **JIT)
def _record(row, c, s0, nh, nm, n_mid, idx, weights, keep, nhigh_part, nmid_part, nkept_part, kept_keys,
            kept_weights):  # fmt: skip
    """A (row, chunk)'s tier counts and, where ``keep`` (the prior / the weights read them), its attended
    keys with their unnormalised weights ``weights[:nh + nm]``."""
    nhigh_part[row, c] = nh
    nmid_part[row, c] = n_mid
    nkept_part[row, c] = nh + nm
    if keep:
        for i in range(nh + nm):
            kept_keys[np.uintp(row), np.uintp(s0 + i)] = idx[np.uintp(i)]
            kept_weights[np.uintp(row), np.uintp(s0 + i)] = weights[np.uintp(i)]


@njit(inline="always", **JIT)
def selection_row(b, kvh, g, t, kheads, groups, tokens, group):
    """Row of the distances / thresholds / tiers that query head ``kvh * groups + g`` selects with."""
    if group:
        return (b * kheads + kvh) * tokens + t
    return (b * kheads * groups + kvh * groups + g) * tokens + t


@njit(**JIT)
def _union_chunk(
    b, kvh, t, groups, kheads, tokens, s0, s1, c, dist, off, has_off, masks,
    th_h, nd_h, tb_h, th_m, nd_m, tb_m, has_mid, tiers, want_tiers, high_f, mid_f, tie_f, idx, mids, ties, dd,
    in_high, in_mid,
):  # fmt: skip
    """The union of the chunk's selections of a GQA group's heads (each by :func:`_select_chunk` on its
    own row): high keys (high for any head) into ``idx[:nh]``, mid keys (mid for any head and high for
    none) into ``idx[nh:nh + nm]`` where ``has_mid``; the union's tiers written into every head's row if
    wanted. Returns ``(nh, nm, mid keys)``; ``dd`` is left to the caller (each head's own distances)."""
    n = s1 - s0
    for i in range(n):
        in_high[i] = 0
        in_mid[i] = 0
    for g in range(groups):
        srow = selection_row(b, kvh, g, t, kheads, groups, tokens, False)
        nh_g, _, mid_g = _select_chunk(
            srow, b, t, tokens, s0, s1, c, dist, off, has_off, masks, th_h, nd_h, tb_h, th_m, nd_m, tb_m,
            False, tiers, False, high_f, mid_f, tie_f, idx, mids, ties, dd,
        )  # fmt: skip
        for i in range(nh_g):
            in_high[np.uintp(idx[np.uintp(i)] - s0)] = 1
        for i in range(mid_g):
            in_mid[np.uintp(mids[np.uintp(i)] - s0)] = 1
    for i in range(n):  # vectorised
        in_mid[i] = in_mid[i] & (in_high[i] ^ np.uint8(1))
    nh = _compact(in_high, n, s0, idx)
    n_mid = _compact(in_mid, n, s0, mids)
    nm = n_mid if has_mid else 0
    for i in range(nm):
        idx[np.uintp(nh + i)] = mids[np.uintp(i)]
    if want_tiers:
        vis = masks.vis
        for g in range(groups):
            srow = selection_row(b, kvh, g, t, kheads, groups, tokens, False)
            r, m = np.uintp(srow), np.uintp(mask_row(srow, masks.dims))
            for i in range(n):
                s = np.uintp(s0 + i)
                tiers[r, s] = HIGH if in_high[i] else MID if in_mid[i] else LOW if vis[m, s] else HIDDEN
    return nh, nm, n_mid


@njit(**JIT)
def _compact(flags, n, base, out):
    """Positions ``base + i`` of the non-zero ``flags[:n]``, ascending, into ``out``; returns how many
    (``out`` has 16 entries of room past ``n``)."""
    count = 0
    i = 0
    while i + 16 <= n:
        count += compress16(flags, i, base, out, count)
        i += 16
    for j in range(i, n):
        out[np.uintp(count)] = base + j
        count += np.int64(flags[np.uintp(j)] != 0)
    return count


@njit(**JIT)
def _select_chunk(
    srow, b, t, tokens, s0, s1, c, dist, off, has_off, masks,
    th_h, nd_h, tb_h, th_m, nd_m, tb_m, has_mid, tiers, want_tiers, high_f, mid_f, tie_f, idx, mids, ties, dd,
):  # fmt: skip
    """One selection row's high keys into ``idx[:nh]`` and mid keys into ``idx[nh:nh + nm]`` (their raw
    distances in ``dd``; the mid keys only where ``has_mid``), tiers written if wanted. Returns
    ``(nh, nm, mid keys)``.

    Keys below the high threshold (and pinned ones) are high and those strictly between the two
    thresholds mid, flagged in one vectorised pass and gathered by compress; only the keys tied at a
    threshold go through the ordered loop that gives ties to the latest keys (the reference's rule)."""
    vis = masks.vis
    mr = mask_row(srow, masks.dims)
    th = th_h[srow]
    tm = th_m[srow]
    r, m, o = np.uintp(srow), np.uintp(mr), np.uintp(b * tokens + t)
    n = s1 - s0
    for i in range(n):  # vectorised
        s = np.uintp(s0 + i)
        k = vis[m, s]
        d = np.int64(dist[r, s]) + (off[o, s] if has_off else 0)
        elig = k == 1
        high_f[i] = (k == 2) | (elig & (d < th))
        mid_f[i] = elig & (d > th) & (d < tm)
        tie_f[i] = elig & ((d == th) | (d == tm))
    nh = _compact(high_f, n, s0, idx)
    n_mid = _compact(mid_f, n, s0, mids)
    n_tie = _compact(tie_f, n, s0, ties)
    cnt_h = tb_h[srow, c]
    cnt_m = tb_m[srow, c]
    ndh = nd_h[srow]
    ndm = nd_m[srow]
    for j in range(n_tie - 1, -1, -1):  # ties at a threshold: in order, latest first
        s = ties[np.uintp(j)]
        d = np.int64(dist[r, np.uintp(s)]) + (off[o, np.uintp(s)] if has_off else 0)
        cnt_h, high_tie = take_tie(cnt_h, ndh, d == th)
        cnt_m, mid_tie = take_tie(cnt_m, ndm, d == tm)
        if high_tie:
            idx[np.uintp(nh)] = s
            nh += 1
        elif d < tm or mid_tie:
            mids[np.uintp(n_mid)] = s
            n_mid += 1
    nm = n_mid if has_mid else 0
    for i in range(nm):
        idx[np.uintp(nh + i)] = mids[np.uintp(i)]
    for i in range(nh + nm):  # the raw distances of the attended keys (the mid estimate reads them)
        dd[np.uintp(i)] = dist[r, np.uintp(idx[np.uintp(i)])]
    if want_tiers:
        for i in range(n):
            s = np.uintp(s0 + i)
            tiers[r, s] = LOW if vis[m, s] else HIDDEN
        for i in range(nh):
            tiers[r, np.uintp(idx[np.uintp(i)])] = HIGH
        for i in range(n_mid):
            tiers[r, np.uintp(mids[np.uintp(i)])] = MID
    return nh, nm, n_mid
