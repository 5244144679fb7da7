"""The decode step of one layer as one compiled call: :func:`step_kernel` and the named tuples it takes.

It runs the passes of :mod:`dashkv.ops.cpu.fused` and the small serial pieces between them (the query
codes, budget counts, thresholds, the momentum mask, the query-side mid-tier inputs, the merge of the
partials, the prior and the weights) without returning to Python: each return to Python cost a numba
dispatch and a few numpy calls, together several times the kernels' own work at 2K keys.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from dashkv.ops.cpu.attend import merge_kernel
from dashkv.ops.cpu.encode import code_key_row, query_codes_kernel
from dashkv.ops.cpu.fused import attend_kernel, calibrate_kernel, distance_kernel
from dashkv.ops.cpu.jit import FASTMATH, JIT, PJIT, mask_row
from dashkv.ops.cpu.select import thresholds


class Budget(NamedTuple):
    """Keys for the high and the mid tier outside ``always``: shares of each selection row's eligible
    keys (``fractions``, as ``DashKVConfig.high`` / ``.mid``), or per-row counts ``[rows]`` int64."""

    fractions: bool
    high: float
    mid: float
    high_rows: np.ndarray
    mid_rows: np.ndarray


class Calibration(NamedTuple):
    """Cross-head consensus and cross-layer momentum of one step (:mod:`dashkv.calibration`).

    ``top``: the largest raw distance (``R``); ``group``: selection per KV head on each key's distance
    to the nearest of the group's query heads; ``min_votes``: 0 turns consensus off; ``spatial_step`` /
    ``temporal_step``: the discounts in whole bits (``<= 0``). Momentum marks keys by ``prior * visible keys >=
    momentum_ratio``, or, where ``temporal_given``, by the mask ``temporal [B*T, S]`` uint8. ``union``:
    each head selects alone and every head of a GQA group attends to the union (``share="union"``)."""

    top: int
    group: bool
    min_votes: int
    spatial_step: int
    temporal_step: int
    momentum_ratio: float
    temporal: np.ndarray
    temporal_given: bool
    union: bool


class MidTier(NamedTuple):
    """The mid-tier estimate's arrays (:func:`dashkv.ops.reference.mid_tier_logits`): key centres
    ``[Hkv, D]``; ``|q|`` and ``q . mu`` per query row (empty: the step computes them); per-head
    temperature, bias, residual byte tables ``[H, 16, 256]`` and ``sum phi``; ``cos(pi d / R)`` for
    ``d = 0..R``. ``on`` False: no mid tier (one-element dummies)."""

    on: bool
    center: np.ndarray
    query_norm: np.ndarray
    query_dot_center: np.ndarray
    temperature: np.ndarray
    bias: np.ndarray
    tables: np.ndarray
    phi_sum: np.ndarray
    cosines: np.ndarray
    bits: int


class Prior(NamedTuple):
    """The cross-layer prior ``[B*T, S]`` float32 this step reads (where ``given``) and whether to return
    its update ``decay * prior + (1 - decay) * mean_h(weights)`` (``want``)."""

    prior: np.ndarray
    given: bool
    decay: float
    want: bool


class Partials(NamedTuple):
    """Per (query row, chunk) results of the attention pass: softmax partials of the high ``[..., 0]``
    and mid ``[..., 1]`` keys (max, sum exp, sum exp * v), the anchor numerator, counts of high, mid
    and attended keys, and the attended keys (high first) with their unnormalised weights at
    ``[row, chunk start + i]`` (``keys``, ``weights``; ``[1, 1]`` when nothing reads them)."""

    m: np.ndarray
    l: np.ndarray  # noqa: E741 - the split softmax's usual name
    acc: np.ndarray
    gap: np.ndarray
    nhigh: np.ndarray
    nmid: np.ndarray
    nkept: np.ndarray
    keys: np.ndarray
    weights: np.ndarray


@njit(**JIT)
def budget_rows(hist, fraction):
    """``budget_counts(eligible keys, fraction)`` of every histogram row (the reference's float64 rule)."""
    rows, nch, slots = hist.shape
    out = np.empty(rows, np.int64)
    for r in range(rows):
        n = 0
        for c in range(nch):
            for j in range(slots - 1):  # the last slot holds the keys that are not eligible
                n += hist[r, c, j]
        k = np.ceil(np.float64(n) * fraction - 1e-9)
        out[r] = min(np.int64(k if k > 0.0 else 0.0), n)
    return out


@njit(**JIT)
def momentum_rows(prior, masks, tokens, ratio):
    """:func:`dashkv.calibration.momentum_mask` of ``prior [B*T, S]``: ``prior * visible keys >= ratio``
    (float32) and visible, as bytes; the visible keys of ``(b, t)`` are its first mask row's."""
    rows, seq = prior.shape
    vis, dims = masks.vis, masks.dims
    out = np.empty((rows, seq), np.uint8)
    r32 = np.float32(ratio)
    for o in range(rows):
        m = np.uintp(mask_row((o // tokens) * dims[0] * tokens + o % tokens, dims))
        n = 0
        for s in range(seq):
            n += np.int64(vis[m, np.uintp(s)] != 0)
        c = np.float32(max(n, 1))
        for s in range(seq):
            us = np.uintp(s)
            out[o, us] = np.uint8((prior[o, us] * c >= r32) & (vis[m, us] != 0))
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


@njit(**JIT)
def code_new_keys(rows, keyenc, coded):
    """Codes and norms of the keys ``[coded, S)`` of every (batch, KV head), written into ``rows.codes``
    and ``rows.norms`` (the cache's buffers): the keys added since the codes were last read."""
    kheads, stride = rows.kv_heads, rows.stride
    centred = np.empty(rows.keys.shape[1], np.float32)
    proj = np.empty(keyenc.proj.shape[1], np.float32)
    for bk in range(rows.keys.shape[0] // stride):  # (batch, KV head) blocks
        for s in range(coded, rows.length):
            code_key_row(rows.keys, bk * stride + s, rows.half, bk % kheads, keyenc.center, keyenc.proj, rows.codes,
                         rows.norms, centred, proj)  # fmt: skip


@njit(fastmath=FASTMATH, **PJIT)
def prior_kernel(parts, factor, heads, tokens, chunk, prior, out):
    """The next layer's prior ``out [B*T, S] = decay * prior + (1 - decay) * mean_h(weights)`` (the mean
    alone where ``prior`` is not given) from the attended keys' weights (``parts.keys`` / ``.weights``
    scaled by ``factor[row, chunk, tier]``): a pass over the keys plus one over the few attended.
    Rows with nothing attended (``factor`` NaN) give NaN, as the reference's softmax does. One task
    is a (batch, token, chunk); heads are summed in order, as a dense sum over them would be."""
    nbt, seq = out.shape
    nch = factor.shape[1]
    for task in prange(nbt * nch):
        o = task // nch
        c = task % nch
        b = o // tokens
        t = o % tokens
        s0 = c * chunk
        s1 = min(seq, s0 + chunk)
        acc = np.zeros(s1 - s0, np.float32)
        for h in range(heads):
            row = np.uintp((b * heads + h) * tokens + t)
            f_high = np.float32(factor[row, c, 0])
            f_mid = np.float32(factor[row, c, 1])
            if np.isnan(f_high):
                acc[:] = np.nan
            nh = parts.nhigh[row, c]
            for i in range(parts.nkept[row, c]):
                j = np.uintp(s0 + i)
                acc[np.uintp(parts.keys[row, j] - s0)] += parts.weights[row, j] * (f_high if i < nh else f_mid)
        inv = np.float32(1.0) / np.float32(heads)
        uo = np.uintp(o)
        for i in range(s1 - s0):
            s = np.uintp(s0 + i)
            current = acc[i] * inv
            out[uo, s] = prior.decay * prior.prior[uo, s] + (np.float32(1.0) - prior.decay) * current if prior.given else current


@njit(**PJIT)
def weights_kernel(parts, factor, chunk, probs):
    """The attention weights ``probs [B*H*T, S]`` (zero outside high and mid; NaN rows where nothing was
    attended) from the attended keys' weights scaled by ``factor[row, chunk, tier]``."""
    rows, seq = probs.shape
    nch = factor.shape[1]
    for task in prange(rows * nch):
        r = np.uintp(task // nch)
        c = task % nch
        s0 = c * chunk
        s1 = min(seq, s0 + chunk)
        f_high = np.float32(factor[r, c, 0])
        f_mid = np.float32(factor[r, c, 1])
        fill = np.float32(np.nan) if np.isnan(f_high) else np.float32(0.0)
        for s in range(s0, s1):
            probs[r, np.uintp(s)] = fill
        nh = parts.nhigh[r, c]
        for i in range(parts.nkept[r, c]):
            j = np.uintp(s0 + i)
            probs[r, np.uintp(parts.keys[r, j])] = parts.weights[r, j] * (f_high if i < nh else f_mid)


# parallel=True although the driver itself has no prange: a cached serial function that calls
# parallel ones segfaults when loaded from numba's cache (numba issue #8578)
@njit(**PJIT)
def step_kernel(q, qc_given, shape, encoder, keyenc, coded, rows, masks, budget, calib, mid, prior, scaling,
                keep_probs, want_tiers_out, dist, off, kept_keys, kept_weights, out, chunk):  # fmt: skip
    """The decode step from the queries on (:func:`dashkv.ops.cpu.layer.dash_attention`).

    ``q [B*H*T, D]`` float32 queries of ``shape = (B, H, T)``; ``qc_given [B, H, T, W]`` their hash
    codes, unless ``encoder.on`` (then the step encodes them); ``rows``, ``masks``: the keys and the
    visibility rows (:mod:`dashkv.ops.cpu.views`); the keys from ``coded`` on have no codes yet: the
    step writes them, by ``keyenc``, into ``rows.codes`` and ``rows.norms``. ``budget``, ``calib``,
    ``mid``, ``prior``: the named tuples above. ``dist``, ``off``: scratch of the right dtypes;
    ``kept_keys`` int32, ``kept_weights`` float32: ``[B*H*T, S]`` scratch where the prior or the weights
    are wanted (``Partials.keys`` / ``.weights``), else ``[1, 1]``.
    Writes ``out [B*H*T, D]`` float32.

    Returns ``(counts [3], prior [B*T, S], probs [B*H*T, S], tiers [rows, S])``; the last three are
    ``[1, 1]`` placeholders unless asked for (``prior.want``; ``keep_probs``; ``want_tiers_out``).
    """
    nbatch, heads, tokens = shape
    dim = q.shape[1]
    nrows = nbatch * heads * tokens
    if coded < rows.length:
        code_new_keys(rows, keyenc, coded)
    if encoder.on:
        words = (encoder.w3.shape[0] + 63) // 64
        codes = np.empty((nrows, words), np.int64)
        query_codes_kernel(q, heads, tokens, encoder.w1, encoder.b1, encoder.w2, encoder.b2, encoder.w3,
                           encoder.b3, encoder.skip, codes)  # fmt: skip
        qc = codes.reshape((nbatch, heads, tokens, words))
    else:
        qc = qc_given
    kheads, seq = rows.kv_heads, rows.length
    group = calib.group
    sel_heads = kheads if group else heads
    hi = calib.top
    srows = nbatch * sel_heads * tokens
    nch = (seq + chunk - 1) // chunk
    raw_bins = hi + 1  # raw distances 0..hi
    hist = np.empty((srows, nch, raw_bins + 4), np.int32)
    distance_kernel(qc, rows, masks, raw_bins, dist, hist, chunk, group)
    bins = raw_bins
    if budget.fractions:  # as DashKVConfig.high / .mid: k_mid = k(high + mid) - k(high)
        kh = budget_rows(hist, budget.high)
        km = budget_rows(hist, budget.high + budget.mid) - kh
    else:
        kh = budget.high_rows
        km = budget.mid_rows
    temporal = calib.temporal
    if not calib.temporal_given and prior.given and calib.temporal_step != 0:
        temporal = momentum_rows(prior.prior, masks, tokens, calib.momentum_ratio)
    time_on = (calib.temporal_given or prior.given) and calib.temporal_step != 0
    votes_on = calib.min_votes > 0 and calib.spatial_step != 0
    calibrated = votes_on or time_on
    lo = (calib.spatial_step if votes_on else 0) + (calib.temporal_step if time_on else 0)
    if calibrated:
        votes_at = thresholds(hist, kh, 0, raw_bins)
        bins = hi - lo + 1  # calibrated distances lo..hi
        raw_hist = hist
        hist = np.empty((srows, nch, bins + 4), np.int32)
        calibrate_kernel(
            dist, masks, sel_heads, tokens, votes_at, calib.min_votes if votes_on else 0,
            calib.spatial_step, temporal, time_on, calib.temporal_step, off, lo, bins, raw_hist, hist,
            chunk,
        )  # fmt: skip
    tiers_at = thresholds(hist, kh, lo, bins) + thresholds(hist, kh + km, lo, bins)
    if mid.on and mid.query_norm.shape[0] != nrows:
        qnorm, qdc = query_mid_inputs(q, heads, tokens, kheads, mid.center)
        mid = MidTier(mid.on, mid.center, qnorm, qdc, mid.temperature, mid.bias, mid.tables, mid.phi_sum, mid.cosines,
                      mid.bits)  # fmt: skip
    nchp = max(1, nch)
    parts = Partials(
        np.empty((nrows, nchp, 2), np.float32), np.empty((nrows, nchp, 2), np.float64),
        np.empty((nrows, nchp, 2, dim), np.float32), np.empty((nrows, nchp), np.float64),
        np.empty((nrows, nchp), np.int64), np.empty((nrows, nchp), np.int64), np.empty((nrows, nchp), np.int64),
        kept_keys, kept_weights,
    )  # fmt: skip
    tiers = np.empty((srows, seq) if want_tiers_out else (1, 1), np.int8)
    attend_kernel(q, qc, rows, masks, dist, off, calibrated, tiers_at, group, calib.union, mid, scaling, parts,
                  tiers, want_tiers_out, chunk)  # fmt: skip
    factor = np.empty(parts.m.shape, np.float64)
    merge_kernel(parts.m, parts.l, parts.acc, parts.gap, parts.nhigh, mid.on, out, factor)
    prior_out = np.empty((nbatch * tokens, seq) if prior.want else (1, 1), np.float32)
    if prior.want:
        prior_kernel(parts, factor, heads, tokens, chunk, prior, prior_out)
    probs = np.empty((nrows, seq) if keep_probs else (1, 1), np.float32)
    if keep_probs:
        weights_kernel(parts, factor, chunk, probs)
    counts = np.empty(3, np.int64)
    counts[0] = parts.nhigh.sum()
    counts[1] = parts.nmid.sum()
    counts[2] = masks.visible - counts[0] - counts[1]
    return counts, prior_out, probs, tiers
