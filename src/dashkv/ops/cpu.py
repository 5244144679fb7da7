"""Fast CPU backend of the DASH-KV kernels: numba, multi-threaded, same signatures as
:mod:`dashkv.ops.reference` (the spec; integers equal exactly, floats within rounding).

Why numba: every step of the decode kernel is a data-dependent scan over ``S`` keys (popcount,
histogram, tie-breaking rank, gather of the selected rows) that torch can only express densely
(``[B, H, T, S, W]`` XORs, ``flip + cumsum`` ranks, ``-inf``-masked dense ``q @ K^T``). Compiled
loops touch each key code once per pass and read K/V rows only for the keys that count. Numba is
already a dependency, compiles for the host CPU (``popcnt``/AVX-512 where present), caches to disk
(``cache=True``) and needs no compiler at install time.

Work split: the key axis is cut into chunks of :data:`CHUNK` keys and one task is a
``(batch, KV head, chunk)`` triple (``(row, chunk)`` where rows are independent), run with ``prange``.
A task loops over the ``H / Hkv`` query heads and ``T`` query tokens that share its KV head, so the
K/V rows a chunk needs are fetched from memory once and reused from L2 by the whole GQA group.
Chunking also balances 9 or 12 heads over 2 cores, which a head-per-thread split cannot.

Selection is exact and sort-free: distances are small integers in ``[lo, hi]``, so a per-(row, chunk)
histogram gives each row's threshold (the reference's ``kth_smallest``), and per-chunk counts of the
keys tied at the threshold give every chunk its starting tie rank: chunks break their ties (later
positions first) independently, in parallel.

Attention is split-softmax (flash-decoding): each (row, chunk) keeps ``max``, ``sum exp`` and an
unnormalised ``sum exp * v`` in fp32, separately for high and mid keys, because the mid logits move
by the row's anchor offset (mean ``exact - estimate`` over its high keys), known only after all
chunks; a merge step combines the partials. K rows are read for high keys only and V rows for high
and mid keys only (gathered by index, prefetched :data:`_AHEAD` keys ahead); code-based estimates are
computed only at mid keys and, for the anchor, at high keys (cosine table, per-head byte tables of
the residual bit weights: 8 lookups per 64 bits). ``exp`` is a vectorised polynomial (about 1 ulp).
bfloat16 / float16 K and V are read as raw bits and widened in the kernel (no fp32 copy of the cache).

:func:`dash_attention` fuses distances, tiers and attention in two passes over the codes (histogram,
then candidates + attention, recomputing the popcounts); no dense ``[B, H, T, S]`` tensor is
materialised unless probabilities or tiers are asked for.

Threads: numba's own pool (``numba.set_num_threads`` / ``NUMBA_NUM_THREADS``), independent of
``torch.set_num_threads``. With the ``omp`` layer and other busy processes on the same cores, spinning
workers can cost a scheduler tick per parallel launch; ``OMP_WAIT_POLICY=passive`` or the ``tbb``
layer (``pip install tbb``) avoids it. All kernels release the GIL.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from dashkv.ops.reference import (
    HIDDEN,
    HIGH,
    LOW,
    MID,
    MidTierInputs,
    budget_counts,
    expand_kv,
)

__all__ = [
    "CHUNK",
    "HIDDEN",
    "HIGH",
    "LOW",
    "MID",
    "MidTierInputs",
    "assign_tiers",
    "budget_counts",
    "dash_attention",
    "expand_kv",
    "hamming_distance",
    "kth_smallest",
    "select_smallest",
    "tiered_attention",
]

CHUNK = 2048
"""Keys per task: a chunk's K and V (0.5 MiB each at D = 64 in fp32) stay in L2 for the GQA group."""

_FASTMATH = {"reassoc", "contract"}  # vectorised dot products; no nnan/ninf: -inf and NaN are meaningful
_JIT = dict(cache=True, nogil=True)
_PJIT = dict(parallel=True, cache=True, nogil=True)


# ----------------------------------------------------------------------------------- intrinsics


@intrinsic
def _popcount(typingctx, x):
    """``llvm.ctpop`` of an int64 word (one ``popcnt`` instruction)."""
    if not isinstance(x, types.Integer) or x.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.int64(x), codegen


@intrinsic
def _bits_as_f32(typingctx, x):
    """Reinterpret the low 32 bits of an integer as a float32."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        width = value.type.width
        if width > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif width < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def _prefetch(typingctx, arr, row, col):
    """Software prefetch (to all cache levels) of the line holding ``arr[row, col]`` of a 2-D array."""
    if not isinstance(arr, types.Array) or arr.ndim != 2:
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], args[2]], wraparound=False)
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, types.intp, types.intp), codegen


_AHEAD = 16  # selected rows prefetched ahead: sparse gathers are latency-bound without it


BF16, F16 = 1, 2
"""``half`` codes: 16-bit K/V arrive as raw ``uint16`` bits, one compiled kernel serving both formats."""


def _f32(x, half):  # pragma: no cover - replaced by the overload in compiled code
    raise NotImplementedError


@overload(_f32)
def _f32_overload(x, half):
    """Load one element as float32: floats are cast; ``uint16`` bits are bfloat16 (``half == BF16``) or
    float16 (``half == F16``). ``half`` is loop-invariant, so LLVM unswitches the loops on it."""
    if isinstance(x, types.Float):
        return lambda x, half: np.float32(x)
    if x == types.uint16:

        def load16(x, half):
            h = np.uint32(x)
            if half == BF16:
                return _bits_as_f32(h << 16)
            o = (h & 0x7FFF) << 13
            f = _bits_as_f32(o) * np.float32(5.192296858534828e33)  # 2 ** 112 rebiases, subnormals too
            if (h & 0x7C00) == 0x7C00:
                f = _bits_as_f32(o | 0x7F800000)  # inf / nan
            return -f if h & 0x8000 else f

        return load16
    return None


# -------------------------------------------------------------------------------- small helpers


@njit(**_JIT)
def _mask_row(row, dims):
    """Row of a broadcast mask for flat row ``(b, h, t)``; ``dims = (H, T, Bm, Hm, Tm)``."""
    heads, tokens, mb, mh, mt = dims[0], dims[1], dims[2], dims[3], dims[4]
    t = row % tokens
    h = (row // tokens) % heads
    b = row // (tokens * heads)
    return ((b % mb) * mh + (h % mh)) * mt + (t % mt)


@njit(**_JIT)
def _thresholds(hist, kvals, lo, nb):
    """Per row threshold (``kth_smallest``), ties still needed, and ties in later chunks.

    ``hist[row, chunk]`` bins (``nb = hi - lo + 1``): ``0`` raw ``< lo``; ``1 + j`` raw ``== lo + j``
    for ``j`` in ``[0, nb]`` (``j = nb``: ``hi + 1``); ``nb + 2`` raw ``> hi + 1``; ``nb + 3`` not
    eligible. The reference clamps distances into ``[lo, hi]`` for the histogram but compares raw
    values when selecting; the extra bins reproduce that exactly for out-of-range distances.
    """
    rows, nch, nbe = hist.shape
    thr = np.empty(rows, np.int64)
    need = np.empty(rows, np.int64)
    tie_base = np.empty((rows, nch), np.int64)
    tot = np.empty(nbe, np.int64)
    for r in range(rows):
        tot[:] = 0
        for c in range(nch):
            for j in range(nbe):
                tot[j] += hist[r, c, j]
        k = kvals[r]
        cum = 0
        cnt = 0
        for j in range(nb):  # the reference's clamped histogram and its cumsum
            cj = tot[j + 1]
            if j == 0:
                cj += tot[0]
            if j == nb - 1:
                cj += tot[nb + 1] + tot[nb + 2]
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


@njit(fastmath=_FASTMATH, inline="always", **_JIT)
def _expf(x):
    """``exp(x)`` for ``x <= 0`` in float32 without a libm call (Cephes' expf polynomial, about 1 ulp),
    so that the loop over a chunk's logits vectorises; ``0`` below ``-87.3`` and for ``-inf``."""
    xc = max(x, np.float32(-87.3))
    n = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = xc - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = (p * r * r + r + np.float32(1.0)) * _bits_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))
    return y if x >= np.float32(-87.3) else np.float32(0.0)


@njit(fastmath=_FASTMATH, **_JIT)
def _estimates(
    lo, hi, idx, dd, kbase, h, q0, q1, kc, a_row, qdc_row, knorm, bias, tab, sumphi, costab, bits, scaling, out
):
    """Mid-tier logits of keys ``idx[lo:hi]`` (distances ``dd``) into ``out[lo:hi]``; see
    :func:`dashkv.ops.reference.mid_tier_logits`: the angle estimate from the distance plus the
    residual ``sum phi - 2 sum_{q_r != k_r} phi_r``, from byte tables of the bit weights over ``q ^ k``.
    One call per (row, chunk): per-key calls with array arguments would cost more than the work."""
    bias_h = bias[h]
    sum_h = sumphi[h]
    th = tab[h]
    two_words = kc.shape[1] > 1
    for i in range(lo, hi):
        krow = kbase + idx[i]
        d = dd[i]
        if 0 <= d <= bits:
            cos = costab[d]
        else:
            cos = np.float32(math.cos(np.float32(math.pi) * np.float32(d) / np.float32(bits)))
        logit = (qdc_row + a_row * knorm[krow] * cos) * scaling + bias_h
        x = np.uint64(q0 ^ kc[krow, 0])
        res = np.float32(0.0)
        for j in range(8):
            res += th[j, (x >> np.uint64(8 * j)) & np.uint64(255)]
        if two_words:
            x = np.uint64(q1 ^ kc[krow, 1])
            for j in range(8):
                res += th[8 + j, (x >> np.uint64(8 * j)) & np.uint64(255)]
        out[i] = logit + (sum_h - np.float32(2.0) * res)


@njit(fastmath=_FASTMATH, **_JIT)
def _softmax_part(logit, lo, hi, idx, vals, half, kbase, acc, probs, row, want_probs):
    """``(max, sum exp)`` of ``logit[lo:hi]`` and ``acc = sum exp * v`` (V rows of those keys only)."""
    dim = acc.shape[0]
    for j in range(dim):
        acc[j] = 0.0
    if hi <= lo:
        return np.float32(-np.inf), 0.0
    line = 64 // vals.itemsize
    for i in range(lo, min(hi, lo + _AHEAD)):
        for j in range(0, dim, line):
            _prefetch(vals, kbase + idx[i], j)
    m = logit[lo]
    for i in range(lo + 1, hi):
        m = max(m, logit[i])
    total = np.float32(0.0)
    for i in range(lo, hi):
        e = _expf(logit[i] - m)
        logit[i] = e
        total += e
    for i in range(lo, hi):
        if i + _AHEAD < hi:
            for j in range(0, dim, line):
                _prefetch(vals, kbase + idx[i + _AHEAD], j)
        e = logit[i]
        vrow = kbase + idx[i]
        for j in range(dim):
            acc[j] += e * _f32(vals[vrow, j], half)
    if want_probs:
        for i in range(lo, hi):
            probs[row, idx[i]] = logit[i]
    return m, np.float64(total)


@njit(fastmath=_FASTMATH, **_JIT)
def _attend_chunk(
    q, row, keys, vals, half, kbase, scaling, idx, nh, nm, dd, logit, est,
    mid_on, h, q0, q1, kc, a_row, qdc_row, knorm, bias, tab, sumphi, costab, bits,
    part_m, part_l, part_acc, probs, want_probs,
):  # fmt: skip
    """Split softmax of one (row, chunk): ``idx[:nh]`` high keys, ``idx[nh:nh + nm]`` mid keys, ``dd``
    their raw distances. High logits read K rows of high keys only; the weighted sums read V rows of
    selected keys only. High and mid keep separate partials (``part_*[0]`` and ``[1]``) because the
    anchor offset of the mid logits is known only once all chunks are done. Returns the chunk's sum
    of ``exact - estimate`` over its high keys (the anchor's numerator; 0 without the mid tier)."""
    dim = q.shape[1]
    line = 64 // keys.itemsize
    for i in range(min(nh, _AHEAD)):
        for j in range(0, dim, line):
            _prefetch(keys, kbase + idx[i], j)
    for i in range(nh):
        if i + _AHEAD < nh:
            for j in range(0, dim, line):
                _prefetch(keys, kbase + idx[i + _AHEAD], j)
        krow = kbase + idx[i]
        dot = np.float32(0.0)
        for j in range(dim):
            dot += q[row, j] * _f32(keys[krow, j], half)
        logit[i] = dot * scaling
    gap = 0.0
    if mid_on:
        args = (idx, dd, kbase, h, q0, q1, kc, a_row, qdc_row, knorm, bias, tab, sumphi, costab, bits, scaling)
        _estimates(0, nh, *args, est)
        for i in range(nh):
            gap += np.float64(logit[i] - est[i])
        _estimates(nh, nh + nm, *args, logit)
    for part, lo, hi in ((0, 0, nh), (1, nh, nh + nm)):
        part_m[part], part_l[part] = _softmax_part(
            logit, lo, hi, idx, vals, half, kbase, part_acc[part], probs, row, want_probs
        )
    return gap


# ------------------------------------------------------------------------------------- kernels


@njit(**_PJIT)
def _hamming_kernel(qc, kc, kheads, out, chunk):
    """``qc [B, H, T, W]``, ``kc [Bk * Hkv * S, W]`` -> ``out [B, H, T, S]`` int32."""
    nbatch, heads, tokens, words = qc.shape
    seq = out.shape[3]
    kbatch = kc.shape[0] // (kheads * seq)
    groups = heads // kheads
    nch = (seq + chunk - 1) // chunk
    for task in prange(nbatch * kheads * nch):
        c = task % nch
        kvh = (task // nch) % kheads
        b = task // (nch * kheads)
        kbase = ((b % kbatch) * kheads + kvh) * seq
        s0 = c * chunk
        s1 = min(seq, s0 + chunk)
        for g in range(groups):
            h = kvh * groups + g
            for t in range(tokens):
                if words == 1:
                    q0 = qc[b, h, t, 0]
                    for s in range(s0, s1):
                        out[b, h, t, s] = _popcount(q0 ^ kc[kbase + s, 0])
                elif words == 2:
                    q0 = qc[b, h, t, 0]
                    q1 = qc[b, h, t, 1]
                    for s in range(s0, s1):
                        out[b, h, t, s] = _popcount(q0 ^ kc[kbase + s, 0]) + _popcount(q1 ^ kc[kbase + s, 1])
                else:
                    for s in range(s0, s1):
                        acc = 0
                        for w in range(words):
                            acc += _popcount(qc[b, h, t, w] ^ kc[kbase + s, w])
                        out[b, h, t, s] = acc
    return out


@njit(**_PJIT)
def _hist_kernel(dist, code, cdims, lo, nb, chunk):
    """Per (row, chunk) histogram of the distances of eligible keys (``code == 1``); bin layout: see
    :func:`_thresholds`."""
    rows, seq = dist.shape
    nch = (seq + chunk - 1) // chunk
    nbe = nb + 4
    trash = nb + 3
    hist = np.zeros((rows, nch, nbe), np.int64)
    for task in prange(rows * nch):
        r = task // nch
        c = task % nch
        cr = _mask_row(r, cdims)
        s0 = c * chunk
        s1 = min(seq, s0 + chunk)
        loc = np.zeros(4 * nbe, np.int64)  # 4 interleaved copies break store-to-load chains
        for s in range(s0, s1):
            j = min(max(np.int64(dist[r, s]) - lo + 1, 0), nb + 2) if code[cr, s] == 1 else trash
            loc[(s & 3) * nbe + j] += 1
        for j in range(nbe):
            hist[r, c, j] = loc[j] + loc[nbe + j] + loc[2 * nbe + j] + loc[3 * nbe + j]
    return hist


@njit(**_PJIT)
def _select_kernel(dist, code, cdims, thr, need, tie_base, out, chunk):
    """Eligible keys below the threshold, and ties at it while the row still needs keys (latest first)."""
    rows, seq = dist.shape
    nch = (seq + chunk - 1) // chunk
    for task in prange(rows * nch):
        r = task // nch
        c = task % nch
        cr = _mask_row(r, cdims)
        s0 = c * chunk
        s1 = min(seq, s0 + chunk)
        t = thr[r]
        nd = need[r]
        cnt = tie_base[r, c]
        for s in range(s1 - 1, s0 - 1, -1):
            d = np.int64(dist[r, s])
            elig = code[cr, s] == 1
            sel = elig & (d < t)
            if elig and d == t:  # ties: in order, latest first
                cnt += 1
                sel = cnt <= nd
            out[r, s] = sel
    return out


@njit(**_PJIT)
def _tiers_kernel(dist, code, cdims, th_h, nd_h, tb_h, th_m, nd_m, tb_m, out, chunk):
    """Tiers from the two thresholds; ``code``: 0 hidden, 1 eligible, 2 always high."""
    rows, seq = dist.shape
    nch = (seq + chunk - 1) // chunk
    for task in prange(rows * nch):
        r = task // nch
        c = task % nch
        cr = _mask_row(r, cdims)
        s0 = c * chunk
        s1 = min(seq, s0 + chunk)
        th = th_h[r]
        tm = th_m[r]
        ndh = nd_h[r]
        ndm = nd_m[r]
        cnt_h = tb_h[r, c]
        cnt_m = tb_m[r, c]
        for s in range(s1 - 1, s0 - 1, -1):
            k = code[cr, s]
            d = np.int64(dist[r, s])
            # branch-free for most keys; only eligible ties at a threshold take the ordered path
            tier = HIGH if d < th else (MID if d < tm else LOW)
            tier = tier if k == 1 else (HIGH if k == 2 else HIDDEN)
            if k == 1 and (d == th or d == tm):
                tier = LOW
                if d < tm:
                    tier = MID
                elif d == tm:
                    cnt_m += 1
                    if cnt_m <= ndm:
                        tier = MID
                if d < th:
                    tier = HIGH
                elif d == th:
                    cnt_h += 1
                    if cnt_h <= ndh:
                        tier = HIGH
            out[r, s] = tier
    return out


@njit(**_JIT)
def _merge_kernel(m_part, l_part, acc_part, gap_part, nhigh_part, mid_on, out, factor):
    """Combine chunk partials. Mid logits move by the anchor offset (mean ``exact - estimate`` over the
    row's high keys; 0 without high keys); ``factor[row, c, tier] = weight of that partial / L``."""
    rows, nch = m_part.shape[0], m_part.shape[1]
    dim = out.shape[1]
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
        for j in range(dim):
            out[r, j] = 0.0
        for c in range(nch):
            for k in range(2):
                w = factor[r, c, k] / total
                factor[r, c, k] = w
                if w != 0.0:
                    for j in range(dim):
                        out[r, j] += acc_part[r, c, k, j] * w
    return out


@njit(**_PJIT)
def _scale_probs(probs, tiers, factor, chunk):
    rows, seq = probs.shape
    nch = factor.shape[1]
    for task in prange(rows * nch):
        r = task // nch
        c = task % nch
        f_high = np.float32(factor[r, c, 0])
        f_mid = np.float32(factor[r, c, 1])
        for s in range(c * chunk, min(seq, (c + 1) * chunk)):
            probs[r, s] *= f_mid if tiers[r, s] == MID else f_high
    return probs


@njit(fastmath=_FASTMATH, **_PJIT)
def _attn_tiers_kernel(
    q, keys, vals, half, kheads, seq, tiers, scaling,
    has_mid, mdist, qcodes, kcodes, qnorm, knorm, qdc, temp, bias, tab, sumphi, costab, bits,
    m_part, l_part, acc_part, gap_part, nhigh_part, probs, want_probs, chunk,
):  # fmt: skip
    """Split-softmax attention over given tiers. ``q [B*H*T, D]`` fp32, ``keys/vals [Bk*Hkv*S, D]``."""
    nbatch, heads, tokens = qcodes.shape[0], qcodes.shape[1], qcodes.shape[2]
    kbatch = keys.shape[0] // (kheads * seq)
    groups = heads // kheads
    nch = (seq + chunk - 1) // chunk
    for task in prange(nbatch * kheads * nch):
        c = task % nch
        kvh = (task // nch) % kheads
        b = task // (nch * kheads)
        kbase = ((b % kbatch) * kheads + kvh) * seq
        s0 = c * chunk
        s1 = min(seq, s0 + chunk)
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
                    nm += np.int64(has_mid & (tier == MID))
                for i in range(nm):
                    idx[nh + i] = idm[i]
                a_row = qdc_row = np.float32(0.0)
                q0 = q1 = np.int64(0)
                if has_mid:
                    for i in range(nh + nm):
                        dd[i] = mdist[row, idx[i]]
                    a_row = temp[h] * qnorm[row]
                    qdc_row = qdc[row]
                    q0 = qcodes[b, h, t, 0]
                    q1 = qcodes[b, h, t, 1] if qcodes.shape[3] > 1 else np.int64(0)
                if want_probs:
                    for s in range(s0, s1):
                        probs[row, s] = 0.0
                gap_part[row, c] = _attend_chunk(
                    q, row, keys, vals, half, kbase, scaling, idx, nh, nm, dd, logit, est,
                    has_mid, h, q0, q1, kcodes, a_row, qdc_row, knorm, bias, tab, sumphi, costab, bits,
                    m_part[row, c], l_part[row, c], acc_part[row, c], probs, want_probs,
                )  # fmt: skip
                nhigh_part[row, c] = nh


@njit(**_JIT)
def _row_distances(qc, b, h, t, kc, kbase, s0, s1, out):
    """Hamming distances of one query code to keys ``s0:s1`` into ``out[:s1 - s0]`` (vectorised popcount)."""
    words = kc.shape[1]
    q0 = qc[b, h, t, 0]
    if words == 1:
        for s in range(s0, s1):
            out[s - s0] = _popcount(q0 ^ kc[kbase + s, 0])
    else:
        q1 = qc[b, h, t, 1]
        for s in range(s0, s1):
            out[s - s0] = _popcount(q0 ^ kc[kbase + s, 0]) + _popcount(q1 ^ kc[kbase + s, 1])
        for w in range(2, words):
            qw = qc[b, h, t, w]
            for s in range(s0, s1):
                out[s - s0] += _popcount(qw ^ kc[kbase + s, w])


@njit(**_PJIT)
def _fused_hist_kernel(qc, kc, kheads, seq, code, cdims, nb, chunk):
    """Distances on the fly -> per (row, chunk) histogram of eligible keys (layout of ``_thresholds``).
    ``code[mask row, s]``: 0 hidden, 1 eligible, 2 always high."""
    nbatch, heads, tokens, words = qc.shape
    kbatch = kc.shape[0] // (kheads * seq)
    groups = heads // kheads
    nch = (seq + chunk - 1) // chunk
    nbe = nb + 4
    trash = nb + 3
    hist = np.zeros((nbatch * heads * tokens, nch, nbe), np.int64)
    for task in prange(nbatch * kheads * nch):
        c = task % nch
        kvh = (task // nch) % kheads
        b = task // (nch * kheads)
        kbase = ((b % kbatch) * kheads + kvh) * seq
        s0 = c * chunk
        s1 = min(seq, s0 + chunk)
        loc = np.zeros(4 * nbe, np.int64)  # 4 interleaved copies break store-to-load chains
        dist = np.empty(s1 - s0, np.int64)
        for g in range(groups):
            h = kvh * groups + g
            for t in range(tokens):
                row = (b * heads + h) * tokens + t
                mr = _mask_row(row, cdims)
                _row_distances(qc, b, h, t, kc, kbase, s0, s1, dist)
                for s in range(s0, s1):  # bin of each key (vectorised), then the scalar increments
                    dist[s - s0] = dist[s - s0] + 1 if code[mr, s] == 1 else trash
                loc[:] = 0
                for i in range(s1 - s0):
                    loc[(i & 3) * nbe + dist[i]] += 1
                for j in range(nbe):
                    hist[row, c, j] = loc[j] + loc[nbe + j] + loc[2 * nbe + j] + loc[3 * nbe + j]
    return hist


@njit(fastmath=_FASTMATH, **_PJIT)
def _fused_attn_kernel(
    q, qc, kc, keys, vals, half, kheads, seq, code, cdims, scaling,
    th_h, nd_h, tb_h, th_m, nd_m, tb_m,
    has_mid, qnorm, knorm, qdc, temp, bias, tab, sumphi, costab, bits,
    m_part, l_part, acc_part, gap_part, nhigh_part, probs, want_probs, tiers, want_tiers, chunk,
):  # fmt: skip
    """Tiers from thresholds + split-softmax attention, one pass over the codes of each chunk."""
    nbatch, heads, tokens, words = qc.shape
    kbatch = keys.shape[0] // (kheads * seq)
    groups = heads // kheads
    nch = (seq + chunk - 1) // chunk
    for task in prange(nbatch * kheads * nch):
        c = task % nch
        kvh = (task // nch) % kheads
        b = task // (nch * kheads)
        kbase = ((b % kbatch) * kheads + kvh) * seq
        s0 = c * chunk
        s1 = min(seq, s0 + chunk)
        dist = np.empty(s1 - s0, np.int64)
        flag = np.empty(s1 - s0, np.bool_)
        cand = np.empty(s1 - s0, np.int64)
        idx = np.empty(s1 - s0, np.int64)
        dd = np.empty(s1 - s0, np.int64)
        logit = np.empty(s1 - s0, np.float32)
        est = np.empty(s1 - s0, np.float32)
        for g in range(groups):
            h = kvh * groups + g
            for t in range(tokens):
                row = (b * heads + h) * tokens + t
                mr = _mask_row(row, cdims)
                th = th_h[row]
                tm = th_m[row]
                tcand = max(th, tm)
                _row_distances(qc, b, h, t, kc, kbase, s0, s1, dist)
                # candidates: always high, or eligible within the larger threshold; flags (vectorised),
                # then a branch-free compaction, latest first
                for s in range(s0, s1):
                    k = code[mr, s]
                    flag[s - s0] = (k == 2) | ((k == 1) & (dist[s - s0] <= tcand))
                n = 0
                for s in range(s1 - 1, s0 - 1, -1):
                    cand[n] = s
                    n += np.int64(flag[s - s0])
                if want_tiers:
                    for s in range(s0, s1):
                        tiers[row, s] = LOW if code[mr, s] else HIDDEN
                # tiers of the candidates (ties: later positions first); high to idx, mid to the front of cand
                cnt_h = tb_h[row, c]
                cnt_m = tb_m[row, c]
                ndh = nd_h[row]
                ndm = nd_m[row]
                nh = 0
                nm = 0
                for i in range(n):
                    s = cand[i]
                    d = dist[s - s0]
                    tier = HIGH if d < th else (MID if d < tm else LOW)
                    if code[mr, s] == 2:
                        tier = HIGH
                    elif d == th or d == tm:  # ties: in order, latest first
                        tier = LOW
                        if d < tm:
                            tier = MID
                        elif d == tm:
                            cnt_m += 1
                            if cnt_m <= ndm:
                                tier = MID
                        if d < th:
                            tier = HIGH
                        elif d == th:
                            cnt_h += 1
                            if cnt_h <= ndh:
                                tier = HIGH
                    if want_tiers:
                        tiers[row, s] = tier
                    idx[nh] = s  # branch-free appends: high to idx, mid to the front of cand
                    dd[nh] = d
                    nh += np.int64(tier == HIGH)
                    cand[nm] = s
                    nm += np.int64(has_mid & (tier == MID))
                for i in range(nm):
                    idx[nh + i] = cand[i]
                    dd[nh + i] = dist[cand[i] - s0]
                a_row = qdc_row = np.float32(0.0)
                q0 = qc[b, h, t, 0]
                q1 = qc[b, h, t, 1] if words > 1 else np.int64(0)
                if has_mid:
                    a_row = temp[h] * qnorm[row]
                    qdc_row = qdc[row]
                if want_probs:
                    for s in range(s0, s1):
                        probs[row, s] = 0.0
                gap_part[row, c] = _attend_chunk(
                    q, row, keys, vals, half, kbase, scaling, idx, nh, nm, dd, logit, est,
                    has_mid, h, q0, q1, kc, a_row, qdc_row, knorm, bias, tab, sumphi, costab, bits,
                    m_part[row, c], l_part[row, c], acc_part[row, c], probs, want_probs,
                )  # fmt: skip
                nhigh_part[row, c] = nh


# ------------------------------------------------------------------------------ torch plumbing


def _check_cpu(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"the cpu backend takes CPU tensors, got one on {t.device}")


def _np(t: torch.Tensor) -> np.ndarray:
    """C-contiguous numpy view (no copy when already contiguous); 16-bit floats as raw ``uint16`` bits."""
    t = t.detach().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _codes(t: torch.Tensor) -> np.ndarray:
    if t.dtype != torch.int64:
        raise ValueError(f"codes must be packed int64 words, got dtype {t.dtype}")
    return _np(t)


def _dist2d(dist: torch.Tensor) -> np.ndarray:
    if dist.dim() != 4 or dist.dtype.is_floating_point or dist.dtype == torch.bool:
        raise ValueError("dist must be an integer tensor [B, H, T, S]")
    if dist.dtype not in (torch.int32, torch.int64):
        dist = dist.to(torch.int64)
    return _np(dist).reshape(math.prod(dist.shape[:3]), dist.shape[3])


def _mask(mask: torch.Tensor, shape: tuple[int, int, int, int], name: str) -> tuple[np.ndarray, np.ndarray]:
    """A bool (or uint8) mask broadcastable to ``[B, H, T, S]`` as ``[Bm * Hm * Tm, S]`` plus its row map."""
    nbatch, heads, tokens, seq = shape
    if mask.dtype not in (torch.bool, torch.uint8):
        mask = mask.to(torch.bool)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    for d in range(3):  # undo zero-stride expansion of the leading dims: no copy of a broadcast mask
        if mask.shape[d] > 1 and mask.stride(d) == 0:
            mask = mask.narrow(d, 0, 1)
    for d, full in enumerate(shape[:3]):
        if mask.shape[d] not in (1, full):
            raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to {shape}")
    if mask.shape[3] != seq:
        if mask.shape[3] != 1:
            raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to {shape}")
        mask = mask.expand(*mask.shape[:3], seq)
    dims = np.array([heads, tokens, mask.shape[0], mask.shape[1], mask.shape[2]], dtype=np.int64)
    return _np(mask).reshape(math.prod(mask.shape[:3]), seq), dims


def _rows(k: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """Per-row int64 values of ``k`` broadcast to ``[B, H, T]``."""
    k = torch.as_tensor(k).to(torch.int64)
    return k.expand(*shape[:3]).contiguous().numpy().reshape(-1)


def _kv_arrays(key: torch.Tensor, value: torch.Tensor, heads: int) -> tuple[np.ndarray, np.ndarray, int]:
    """K and V as ``[Bk * Hkv * S, D]`` views plus their 16-bit format (0: a float dtype as is)."""
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 4 or heads % t.shape[1]:
            raise ValueError(f"{name} must be [B, Hkv, S, D] with H % Hkv == 0, got {tuple(t.shape)}")
    if key.dtype != value.dtype or not key.dtype.is_floating_point:
        key, value = key.to(torch.float32), value.to(torch.float32)
    half = {torch.bfloat16: BF16, torch.float16: F16}.get(key.dtype, 0)
    flat = lambda t: _np(t).reshape(math.prod(t.shape[:3]), t.shape[3])  # noqa: E731
    return flat(key), flat(value), half


@njit(**_JIT)
def _byte_tables(phi):
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
def _cos_table(bits: int) -> np.ndarray:
    """``cos(pi * d / R)`` for ``d = 0..R``, computed as the reference does (fp32 torch)."""
    return torch.cos(math.pi * torch.arange(bits + 1, dtype=torch.float32) / bits).numpy()


def _mid_arrays(mid: MidTierInputs | None, query_shape: tuple[int, ...], key_shape: tuple[int, ...], words: int):
    """Per-head tables and flat views of the mid-tier inputs (dummies when ``mid`` is None).

    ``query_shape`` is ``(B, H, T)`` and ``key_shape`` ``(Bk, Hkv, S)``: the norms are broadcast to
    them, so that they are indexed like the query rows and the K rows.
    """
    if mid is None:
        f1 = np.zeros(1, np.float32)
        return (False, f1, f1, f1, f1, f1, np.zeros((1, 16, 256), np.float32), f1, f1, 1)
    heads = query_shape[1]
    bits = int(mid.bits)
    if bits < 1 or bits > 64 * words or words > 2:
        raise ValueError(f"mid tier needs 1..{64 * words} bits in at most 2 words, got bits={bits}")
    residual = mid.residual.detach().to(torch.float32).reshape(heads, -1)[:, :bits]
    tab = _byte_tables(np.ascontiguousarray(residual.numpy()))
    sumphi = residual.sum(-1).numpy()
    def f32(t, shape):
        return _np(torch.as_tensor(t).detach().to(torch.float32).expand(shape)).reshape(-1)

    return (
        True,
        f32(mid.query_norm, query_shape),
        f32(mid.key_norm, key_shape),
        f32(mid.query_dot_center, query_shape),
        f32(mid.temperature, (heads,)),
        f32(mid.bias, (heads,)),
        tab,
        sumphi,
        _cos_table(bits),
        bits,
    )


def _budget_counts_np(num_eligible: np.ndarray, fraction: float) -> np.ndarray:
    """:func:`dashkv.ops.reference.budget_counts` in numpy (the same float64 operations)."""
    k = np.maximum(np.ceil(num_eligible.astype(np.float64) * fraction - 1e-9), 0).astype(np.int64)
    return np.minimum(k, num_eligible)


def _parts(rows: int, seq: int, dim: int):
    """Per (row, chunk) partials: max and sum exp and sum exp * v of high ``[..., 0]`` and mid
    ``[..., 1]`` keys, the anchor numerator and the number of high keys."""
    nch = max(1, -(-seq // CHUNK))
    m_part = np.full((rows, nch, 2), -np.inf, np.float32)
    l_part = np.zeros((rows, nch, 2), np.float64)
    acc_part = np.zeros((rows, nch, 2, dim), np.float32)
    gap_part = np.zeros((rows, nch), np.float64)
    nhigh_part = np.zeros((rows, nch), np.int64)
    return m_part, l_part, acc_part, gap_part, nhigh_part


def _finish(parts, mid_on, probs, tiers, shape, dtype):
    """Merge the partials into ``[B, H, T, D]`` in ``dtype``; normalise ``probs`` in place if given."""
    nbatch, heads, tokens, dim = shape
    m_part = parts[0]
    out = np.empty((nbatch * heads * tokens, dim), np.float64)
    factor = np.empty(m_part.shape, np.float64)
    _merge_kernel(*parts, mid_on, out, factor)
    output = torch.from_numpy(out).view(nbatch, heads, tokens, dim).to(torch.float32).to(dtype)
    if probs is None:
        return output, None
    _scale_probs(probs, tiers, factor, CHUNK)
    return output, torch.from_numpy(probs).view(nbatch, heads, tokens, -1)


# --------------------------------------------------------------------------------- public API


def hamming_distance(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    """Packed Hamming distance ``[B, H, T, S]`` int32 (see :func:`dashkv.ops.reference.hamming_distance`)."""
    _check_cpu(query_codes, key_codes)
    nbatch, heads, tokens, words = query_codes.shape
    kb, kheads, seq, kw = key_codes.shape
    if kw != words or heads % kheads or kb not in (1, nbatch):
        raise ValueError(f"codes {tuple(query_codes.shape)} and {tuple(key_codes.shape)} do not match")
    out = np.empty((nbatch, heads, tokens, seq), np.int32)
    if out.size:
        _hamming_kernel(_codes(query_codes), _codes(key_codes).reshape(kb * kheads * seq, words), kheads, out, CHUNK)
    return torch.from_numpy(out)


def _codes_of(visible: torch.Tensor, always: torch.Tensor | None) -> torch.Tensor:
    """One byte per key: 0 hidden, 1 eligible, 2 always high (visible sinks and window)."""
    visible = visible.to(torch.bool)
    code = visible.to(torch.uint8)
    if always is not None:
        code = code + (visible & always.to(torch.bool)).to(torch.uint8)
    return code


def _histogram(dist, code, lo, hi):
    if hi < lo:
        raise ValueError(f"empty distance range [{lo}, {hi}]")
    d2 = _dist2d(dist)
    code_np, cdims = _mask(code, tuple(dist.shape), "eligible")
    return d2, code_np, cdims, _hist_kernel(d2, code_np, cdims, int(lo), int(hi) - int(lo) + 1, CHUNK)


def kth_smallest(dist: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The k-th smallest eligible distance per row ``[B, H, T]`` int64 (see the reference)."""
    _check_cpu(dist, eligible, k)
    _, _, _, hist = _histogram(dist, eligible.to(torch.bool).to(torch.uint8), lo, hi)
    thr, _, _ = _thresholds(hist, _rows(k, dist.shape), int(lo), int(hi) - int(lo) + 1)
    return torch.from_numpy(thr).view(dist.shape[:3])


def select_smallest(dist: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Exactly ``min(k, n)`` eligible keys of smallest distance per row, ties to later positions."""
    _check_cpu(dist, eligible, k)
    d2, code, cdims, hist = _histogram(dist, eligible.to(torch.bool).to(torch.uint8), lo, hi)
    thr, need, tie_base = _thresholds(hist, _rows(k, dist.shape), int(lo), int(hi) - int(lo) + 1)
    out = np.empty(d2.shape, np.bool_)
    _select_kernel(d2, code, cdims, thr, need, tie_base, out, CHUNK)
    return torch.from_numpy(out).view(dist.shape)


def assign_tiers(
    dist: torch.Tensor,
    visible: torch.Tensor,
    always: torch.Tensor,
    k_high: torch.Tensor,
    k_mid: torch.Tensor,
    lo: int,
    hi: int,
) -> torch.Tensor:
    """Tiers ``[B, H, T, S]`` int8: 2 high, 1 mid, 0 low, -1 hidden (see the reference)."""
    _check_cpu(dist, visible, always)
    shape = tuple(dist.shape)
    d2, code, cdims, hist = _histogram(dist, _codes_of(visible, always), lo, hi)
    nb = int(hi) - int(lo) + 1
    kh = torch.as_tensor(k_high)
    th_h, nd_h, tb_h = _thresholds(hist, _rows(kh, shape), int(lo), nb)
    th_m, nd_m, tb_m = _thresholds(hist, _rows(kh + torch.as_tensor(k_mid), shape), int(lo), nb)
    out = np.empty(d2.shape, np.int8)
    _tiers_kernel(d2, code, cdims, th_h, nd_h, tb_h, th_m, nd_m, tb_m, out, CHUNK)
    return torch.from_numpy(out).view(shape)


def tiered_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    tiers: torch.Tensor,
    scaling: float,
    mid: MidTierInputs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over high (exact) and mid (estimated) keys: ``(output [B, H, T, D], probs [B, H, T, S])``.

    Reads K rows of high keys and V rows of high and mid keys only. Code-based estimates are computed
    only where the tier is mid, and at high keys for the anchor offset (mean ``exact - estimate`` over
    the row's high keys, added to the mid logits). ``probs`` is float32 and zero outside high and mid
    (NaN rows where nothing is selected, as torch's softmax of all ``-inf``).
    """
    _check_cpu(query, key, value, tiers)
    nbatch, heads, tokens, dim = query.shape
    seq = key.shape[2]
    kheads = key.shape[1]
    if seq == 0:  # the reference's softmax over no keys: empty weights, zero output
        return torch.zeros_like(query), torch.zeros(nbatch, heads, tokens, 0)
    keys, vals, half = _kv_arrays(key, value, heads)
    q = _np(query.detach().to(torch.float32)).reshape(-1, dim)
    tiers_np = _np(tiers.to(torch.int8).expand(nbatch, heads, tokens, seq)).reshape(nbatch * heads * tokens, seq)
    rows = nbatch * heads * tokens
    if mid is not None:
        _check_cpu(mid.dist, mid.query_codes, mid.key_codes)
        mdist = _dist2d(mid.dist.expand(nbatch, heads, tokens, seq))
        qcodes = _codes(mid.query_codes)
        kcodes = _codes(mid.key_codes).reshape(math.prod(mid.key_codes.shape[:3]), mid.key_codes.shape[3])
        if mdist.dtype != np.int32:
            mdist = mdist.astype(np.int32)
        if mid.key_codes.shape[:3] != key.shape[:3] or mid.query_codes.shape[:3] != query.shape[:3]:
            raise ValueError("mid.query_codes / mid.key_codes do not match query / key shapes")
        margs = _mid_arrays(mid, (nbatch, heads, tokens), tuple(key.shape[:3]), qcodes.shape[-1])
    else:
        mdist = np.zeros((1, 1), np.int32)
        qcodes = np.zeros((nbatch, heads, tokens, 1), np.int64)
        kcodes = np.zeros((1, 1), np.int64)
        margs = _mid_arrays(None, (nbatch, heads, tokens), tuple(key.shape[:3]), 1)
    parts = _parts(rows, seq, dim)
    probs = np.empty((rows, seq), np.float32)
    _attn_tiers_kernel(
        q, keys, vals, half, kheads, seq, tiers_np, np.float32(scaling), margs[0], mdist, qcodes, kcodes,
        *margs[1:], *parts, probs, True, CHUNK,
    )  # fmt: skip
    output, probs_t = _finish(parts, margs[0], probs, tiers_np, (nbatch, heads, tokens, dim), query.dtype)
    return output, probs_t


def dash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_codes: torch.Tensor,
    key_codes: torch.Tensor,
    k_high: torch.Tensor | float,
    k_mid: torch.Tensor | float,
    scaling: float,
    visible: torch.Tensor | None = None,
    always: torch.Tensor | None = None,
    mid: MidTierInputs | None = None,
    return_probs: bool = False,
    return_tiers: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Fused decode step: Hamming distances, tiers and tiered attention in two passes over the codes.

    Equals ``tiered_attention(q, K, V, assign_tiers(hamming_distance(qc, kc), visible, always,
    k_high, k_mid, 0, 64 * W), scaling, mid)`` -- tiers ranked by the raw Hamming distance (no
    calibration) -- without materialising distances, tiers or probabilities: one pass over the codes
    builds per-chunk histograms, a second one recomputes the distances, picks each chunk's high and
    mid keys and attends to them.

    Parameters
    ----------
    query : Tensor[B, H, T, D]
    key, value : Tensor[B, Hkv, S, D]
    query_codes : Tensor[B, H, T, W], int64
    key_codes : Tensor[B, Hkv, S, W], int64
    k_high, k_mid : Tensor[B, H or 1, T] int64 -- keys for high and for mid outside ``always``; or two
        floats, fractions of each row's eligible keys as in ``DashKVConfig`` (``k_high =
        budget_counts(n, high)``, ``k_mid = budget_counts(n, high + mid) - k_high``)
    scaling : float
    visible, always : Tensor[B, 1 or H, T, S] bool, or None (all visible / none always)
    mid : MidTierInputs or None -- only ``bits``, the norms, ``temperature``, ``bias`` and
        ``residual`` are read (``dist`` and codes come from the fused pass and may be None)
    return_probs, return_tiers : also return the ``[B, H, T, S]`` probabilities / tiers

    Returns
    -------
    output : Tensor[B, H, T, D], query's dtype
    probs : Tensor[B, H, T, S] float32 or None
    tiers : Tensor[B, H, T, S] int8 or None
    """
    _check_cpu(query, key, value, query_codes, key_codes)
    nbatch, heads, tokens, dim = query.shape
    kheads, seq = key.shape[1], key.shape[2]
    words = query_codes.shape[-1]
    shape = (nbatch, heads, tokens, seq)
    if seq == 0:  # as the reference steps: empty weights and tiers, zero output
        empty = torch.zeros(shape)
        return torch.zeros_like(query), empty if return_probs else None, empty.to(torch.int8) if return_tiers else None
    if tuple(query_codes.shape[:3]) != shape[:3] or key_codes.shape[:3] != key.shape[:3]:
        raise ValueError("codes do not match query / key shapes")
    qc = _codes(query_codes)
    kc = _codes(key_codes).reshape(math.prod(key_codes.shape[:3]), words)
    keys, vals, half = _kv_arrays(key, value, heads)
    q = _np(query.detach().to(torch.float32)).reshape(-1, dim)
    vis_t = visible if visible is not None else torch.ones(1, 1, 1, seq, dtype=torch.bool)
    code, cdims = _mask(_codes_of(vis_t, always), shape, "visible / always")
    rows = nbatch * heads * tokens
    nb = 64 * words + 1  # distances 0..64W; lo = 0
    hist = _fused_hist_kernel(qc, kc, kheads, seq, code, cdims, nb, CHUNK)
    if isinstance(k_high, float) != isinstance(k_mid, float):
        raise ValueError("k_high and k_mid must both be fractions (float) or both key counts (tensors)")
    if isinstance(k_high, float):  # fractions, as DashKVConfig.high / .mid: k_mid = k(high + mid) - k(high)
        eligible = hist[:, :, : nb + 3].sum(axis=(1, 2))
        kh = _budget_counts_np(eligible, k_high)
        km = _budget_counts_np(eligible, k_high + k_mid) - kh
    else:
        kh, km = _rows(k_high, shape), _rows(k_mid, shape)
    th_h, nd_h, tb_h = _thresholds(hist, kh, 0, nb)
    th_m, nd_m, tb_m = _thresholds(hist, kh + km, 0, nb)
    margs = _mid_arrays(mid, (nbatch, heads, tokens), tuple(key.shape[:3]), words)
    parts = _parts(rows, seq, dim)
    want_tiers = return_tiers or return_probs  # normalising probs needs each key's tier
    probs = np.empty((rows, seq) if return_probs else (1, 1), np.float32)
    tiers = np.empty((rows, seq) if want_tiers else (1, 1), np.int8)
    _fused_attn_kernel(
        q, qc, kc, keys, vals, half, kheads, seq, code, cdims, np.float32(scaling),
        th_h, nd_h, tb_h, th_m, nd_m, tb_m, *margs,
        *parts, probs, return_probs, tiers, want_tiers, CHUNK,
    )  # fmt: skip
    output, probs_t = _finish(
        parts, margs[0], probs if return_probs else None, tiers, (nbatch, heads, tokens, dim), query.dtype
    )
    tiers_t = torch.from_numpy(tiers).view(shape) if return_tiers else None
    return output, probs_t, tiers_t
