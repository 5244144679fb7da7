"""The fused decode step of one layer as one compiled call (see :func:`dashkv.ops.cpu.api.dash_attention`).

:func:`step_kernel` runs the passes of :mod:`dashkv.ops.cpu.fused` and the small serial pieces
between them (budget counts, thresholds, the momentum mask, the query-side mid-tier inputs, the merge
of the partials and the prior update) without returning to Python: each return to Python cost
a numba dispatch and a few numpy calls, together several times the kernels' own work at 2K keys.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from dashkv.ops.cpu.attend import merge_kernel, weights_kernel
from dashkv.ops.cpu.fused import attend_kernel, calibrate_kernel, distance_kernel
from dashkv.ops.cpu.jit import JIT, PJIT
from dashkv.ops.cpu.select import thresholds


@njit(**JIT)
def budget_rows(hist, fraction):
    """``budget_counts(eligible keys, fraction)`` of every histogram row (the reference's float64 rule)."""
    rows, nch, nbe = hist.shape
    out = np.empty(rows, np.int64)
    for r in range(rows):
        n = 0
        for c in range(nch):
            for j in range(nbe - 1):  # the last bin holds the keys that are not eligible
                n += hist[r, c, j]
        k = np.ceil(np.float64(n) * fraction - 1e-9)
        out[r] = min(np.int64(k if k > 0.0 else 0.0), n)
    return out


@njit(**JIT)
def momentum_rows(prior, visible, count, ratio):
    """:func:`dashkv.calibration.momentum_mask` of ``prior [B*T, S]``: ``prior * count >= ratio`` (float32)
    and visible, as bytes."""
    rows, seq = prior.shape
    out = np.empty((rows, seq), np.uint8)
    r32 = np.float32(ratio)
    for r in range(rows):
        c = count[r, 0]
        for s in range(seq):
            out[r, s] = np.uint8((prior[r, s] * c >= r32) & visible[r, s])
    return out


@njit(**JIT)
def query_mid_inputs(q, heads, tokens, kheads, center):
    """``|q|`` and ``q . mu`` (``mu`` the key centre of q's KV head) of every query row ``(b, h, t)``."""
    rows, dim = q.shape
    groups = heads // kheads
    qnorm = np.empty(rows, np.float32)
    qdc = np.empty(rows, np.float32)
    for n in range(rows):
        kvh = ((n // tokens) % heads) // groups
        sq = np.float32(0.0)
        dot = np.float32(0.0)
        for j in range(dim):
            sq += q[n, j] * q[n, j]
            dot += q[n, j] * center[kvh, j]
        qnorm[n] = np.sqrt(sq)
        qdc[n] = dot
    return qnorm, qdc


# parallel=True although the driver itself has no prange: a cached serial function that calls
# parallel ones segfaults when loaded from numba's cache (numba issue #8578)
@njit(**PJIT)
def step_kernel(
    q, qc, kc, keys, vals, half, kheads, seq, kstride, code, cdims, visible_total,
    use_fractions, frac_high, frac_mid, kh_rows, km_rows, top, group, scaling,
    min_votes, spatial_step, temporal, has_temporal, temporal_step, off,
    has_mid, knorm, center, qnorm_in, qdc_in, temp, bias, tab, sumphi, costab, bits,
    prior, has_prior, decay, want_prior, keep_probs, want_tiers_out, dist, out, chunk,
):  # fmt: skip
    """The decode step from the query codes on (:func:`dashkv.ops.cpu.api.dash_attention`).

    Arrays as the passes of :mod:`dashkv.ops.cpu.fused` take them: ``q [B*H*T, D]`` float32, ``qc
    [B, H, T, W]``, ``kc / keys / vals / knorm`` key rows of head stride ``kstride``, ``code / cdims``
    the visibility bytes (0 hidden, 1 eligible, 2 always high) and their row map. ``use_fractions``:
    the budgets are ``frac_high`` / ``frac_mid`` of each selection row's eligible keys, else the
    counts ``kh_rows`` / ``km_rows``. ``top``: one head's largest distance. ``temporal``: momentum
    mask rows ``[B*T, S]`` where ``has_temporal``. Mid tier: ``qnorm_in`` / ``qdc_in`` given (length
    ``B*H*T``), or computed from ``center`` when they are empty. ``dist``, ``off``: scratch of the
    right dtypes. Writes ``out [B*H*T, D]`` float32.

    Returns ``(counts [3], prior [B*T, S], probs [B*H*T, S], tiers [rows, S])``; the last three are
    ``[1, 1]`` placeholders unless asked for (``want_prior``; ``keep_probs``; ``want_tiers_out``).
    """
    nbatch, heads, tokens, words = qc.shape
    dim = q.shape[1]
    rows = nbatch * heads * tokens
    sel_heads = kheads if group else heads
    scale = heads // kheads if group else 1
    hi = top * scale
    srows = nbatch * sel_heads * tokens
    nch = (seq + chunk - 1) // chunk
    nb = hi + 1  # raw distances 0..hi
    hist = np.empty((srows, nch, nb + 4), np.int32)
    distance_kernel(qc, kc, kheads, seq, kstride, code, cdims, nb, dist, hist, chunk, group)
    if use_fractions:  # as DashKVConfig.high / .mid: k_mid = k(high + mid) - k(high)
        kh = budget_rows(hist, frac_high)
        km = budget_rows(hist, frac_high + frac_mid) - kh
    else:
        kh = kh_rows
        km = km_rows
    votes_on = min_votes > 0 and spatial_step != 0
    time_on = has_temporal and temporal_step != 0
    calibrated = votes_on or time_on
    lo = ((spatial_step if votes_on else 0) + (temporal_step if time_on else 0)) * scale
    if calibrated:
        thr, need, tie_base = thresholds(hist, kh, 0, nb)
        nb = hi - lo + 1
        raw_hist = hist
        hist = np.empty((srows, nch, nb + 4), np.int32)
        calibrate_kernel(
            dist, code, cdims, sel_heads, tokens, thr, need, tie_base, min_votes if votes_on else 0,
            spatial_step * scale, temporal, time_on, temporal_step * scale, off, lo, nb, raw_hist, hist, chunk,
        )  # fmt: skip
    th_h, nd_h, tb_h = thresholds(hist, kh, lo, nb)
    th_m, nd_m, tb_m = thresholds(hist, kh + km, lo, nb)
    qnorm, qdc = qnorm_in, qdc_in
    if has_mid and qnorm_in.shape[0] != rows:
        qnorm, qdc = query_mid_inputs(q, heads, tokens, kheads, center)
    nchp = max(1, nch)
    m_part = np.empty((rows, nchp, 2), np.float32)
    l_part = np.empty((rows, nchp, 2), np.float64)
    acc_part = np.empty((rows, nchp, 2, dim), np.float32)
    gap_part = np.empty((rows, nchp), np.float64)
    nhigh_part = np.empty((rows, nchp), np.int64)
    nmid_part = np.empty((rows, nchp), np.int64)
    want_probs = keep_probs or want_prior
    want_tiers = want_tiers_out or want_probs  # normalising probs needs each key's tier
    probs = np.empty((rows, seq) if want_probs else (1, 1), np.float32)
    tiers = np.empty((srows, seq) if want_tiers else (1, 1), np.int8)
    attend_kernel(
        q, qc, kc, dist, off, calibrated, keys, vals, half, kheads, seq, kstride, code, cdims,
        np.float32(scaling), th_h, nd_h, tb_h, th_m, nd_m, tb_m, group,
        has_mid, qnorm, knorm, qdc, temp, bias, tab, sumphi, costab, bits,
        m_part, l_part, acc_part, gap_part, nhigh_part, nmid_part, probs, want_probs, tiers, want_tiers, chunk,
    )  # fmt: skip
    factor = np.empty(m_part.shape, np.float64)
    merge_kernel(m_part, l_part, acc_part, gap_part, nhigh_part, has_mid, out, factor)
    prior_out = np.empty((nbatch * tokens, seq) if want_probs else (1, 1), np.float32)
    if want_probs:
        weights_kernel(
            probs, tiers, factor, heads, kheads, tokens, group, chunk, keep_probs,
            prior if has_prior else prior_out, has_prior, np.float32(decay), prior_out,
        )  # fmt: skip
    counts = np.empty(3, np.int64)
    counts[0] = nhigh_part.sum()
    counts[1] = nmid_part.sum()
    counts[2] = visible_total - counts[0] - counts[1]
    return counts, prior_out, probs, tiers
