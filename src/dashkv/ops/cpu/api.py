"""Public functions of the CPU backend: the reference signatures plus the fused :func:`dash_attention`."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from dashkv.ops.cpu import fused, plumbing as pl
from dashkv.ops.cpu.attend import attn_tiers_kernel
from dashkv.ops.cpu.select import hamming_kernel, hist_kernel, select_kernel, thresholds, tiers_kernel
from dashkv.ops.reference import MidTierInputs

CHUNK = 2048
"""Keys per task: a chunk's K and V (0.5 MiB each at D = 64 in fp32) stay in L2 for the GQA group."""


# --------------------------------------------------------------------------------- public API


def hamming_distance(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    """Packed Hamming distance ``[B, H, T, S]`` int32 (see :func:`dashkv.ops.reference.hamming_distance`)."""
    pl.check_cpu(query_codes, key_codes)
    nbatch, heads, tokens, words = query_codes.shape
    kb, kheads, seq, kw = key_codes.shape
    if kw != words or heads % kheads or kb not in (1, nbatch):
        raise ValueError(f"codes {tuple(query_codes.shape)} and {tuple(key_codes.shape)} do not match")
    out = np.empty((nbatch, heads, tokens, seq), np.int32)
    if out.size:
        kc = pl.codes_array(key_codes).reshape(kb * kheads * seq, words)
        hamming_kernel(pl.codes_array(query_codes), kc, kheads, out, CHUNK)
    return torch.from_numpy(out)


def _histogram(dist, code, lo, hi):
    if hi < lo:
        raise ValueError(f"empty distance range [{lo}, {hi}]")
    d2 = pl.dist2d(dist)
    code_np, cdims = pl.mask_array(code, tuple(dist.shape), "eligible")
    return d2, code_np, cdims, hist_kernel(d2, code_np, cdims, int(lo), int(hi) - int(lo) + 1, CHUNK)


def code_scan_plan(
    query_codes: torch.Tensor, key_codes: torch.Tensor
) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """The first pass of :func:`dash_attention` alone, for benchmarks: checks and views made once
    (a plan), the returned function runs the pass and returns the raw distances ``[B*H*T, S]`` (uint8
    for up to 3 words) and the per (row, chunk) histograms, every key visible and eligible. Timing
    the function times the scan itself; the fused step pays its checks and views once per call.

    Parameters
    ----------
    query_codes : Tensor[B, H, T, W], int64
    key_codes : Tensor[B, Hkv, S, W], int64
    """
    pl.check_cpu(query_codes, key_codes)
    nbatch, heads, tokens, words = query_codes.shape
    kheads, seq = key_codes.shape[1], key_codes.shape[2]
    code, cdims = pl.mask_array(torch.ones(1, 1, 1, seq, dtype=torch.uint8), (nbatch, heads, tokens, seq), "codes")
    qc = pl.codes_array(query_codes)
    kc = pl.codes_array(key_codes).reshape(math.prod(key_codes.shape[:3]), words)
    nb = 64 * words + 1
    dist = np.empty((nbatch * heads * tokens, seq), pl.dist_dtype(words))
    hist = np.empty((nbatch * heads * tokens, -(-seq // CHUNK), nb + 4), np.int32)

    def run() -> tuple[np.ndarray, np.ndarray]:
        fused.distance_kernel(qc, kc, kheads, seq, code, cdims, nb, dist, hist, CHUNK)
        return dist, hist

    return run


def kth_smallest(dist: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The k-th smallest eligible distance per row ``[B, H, T]`` int64 (see the reference)."""
    pl.check_cpu(dist, eligible, k)
    _, _, _, hist = _histogram(dist, eligible.to(torch.bool).to(torch.uint8), lo, hi)
    thr, _, _ = thresholds(hist, pl.rows_of(k, dist.shape), int(lo), int(hi) - int(lo) + 1)
    return torch.from_numpy(thr).view(dist.shape[:3])


def select_smallest(dist: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Exactly ``min(k, n)`` eligible keys of smallest distance per row, ties to later positions."""
    pl.check_cpu(dist, eligible, k)
    d2, code, cdims, hist = _histogram(dist, eligible.to(torch.bool).to(torch.uint8), lo, hi)
    thr, need, tie_base = thresholds(hist, pl.rows_of(k, dist.shape), int(lo), int(hi) - int(lo) + 1)
    out = np.empty(d2.shape, np.bool_)
    select_kernel(d2, code, cdims, thr, need, tie_base, out, CHUNK)
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
    pl.check_cpu(dist, visible, always)
    shape = tuple(dist.shape)
    d2, code, cdims, hist = _histogram(dist, pl.codes_of(visible, always), lo, hi)
    nb = int(hi) - int(lo) + 1
    kh = torch.as_tensor(k_high)
    th_h, nd_h, tb_h = thresholds(hist, pl.rows_of(kh, shape), int(lo), nb)
    th_m, nd_m, tb_m = thresholds(hist, pl.rows_of(kh + torch.as_tensor(k_mid), shape), int(lo), nb)
    out = np.empty(d2.shape, np.int8)
    tiers_kernel(d2, code, cdims, th_h, nd_h, tb_h, th_m, nd_m, tb_m, out, CHUNK)
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
    pl.check_cpu(query, key, value, tiers)
    nbatch, heads, tokens, dim = query.shape
    seq = key.shape[2]
    kheads = key.shape[1]
    if seq == 0:  # the reference's softmax over no keys: empty weights, zero output
        return torch.zeros_like(query), torch.zeros(nbatch, heads, tokens, 0)
    keys, vals, half = pl.kv_arrays(key, value, heads)
    q = pl.as_numpy(query.detach().to(torch.float32)).reshape(-1, dim)
    tiers_np = pl.as_numpy(tiers.to(torch.int8).expand(nbatch, heads, tokens, seq)).reshape(-1, seq)
    rows = nbatch * heads * tokens
    if mid is not None:
        pl.check_cpu(mid.dist, mid.query_codes, mid.key_codes)
        mdist = pl.dist2d(mid.dist.expand(nbatch, heads, tokens, seq))
        qcodes = pl.codes_array(mid.query_codes)
        kcodes = pl.codes_array(mid.key_codes).reshape(math.prod(mid.key_codes.shape[:3]), mid.key_codes.shape[3])
        if mdist.dtype != np.int32:
            mdist = mdist.astype(np.int32)
        if mid.key_codes.shape[:3] != key.shape[:3] or mid.query_codes.shape[:3] != query.shape[:3]:
            raise ValueError("mid.query_codes / mid.key_codes do not match query / key shapes")
        margs = pl.mid_arrays(mid, (nbatch, heads, tokens), tuple(key.shape[:3]), qcodes.shape[-1])
    else:
        mdist = np.zeros((1, 1), np.int32)
        qcodes = np.zeros((nbatch, heads, tokens, 1), np.int64)
        kcodes = np.zeros((1, 1), np.int64)
        margs = pl.mid_arrays(None, (nbatch, heads, tokens), tuple(key.shape[:3]), 1)
    parts = pl.new_parts(rows, seq, dim, CHUNK)
    probs = np.empty((rows, seq), np.float32)
    attn_tiers_kernel(
        q, keys, vals, half, kheads, seq, tiers_np, np.float32(scaling), margs[0], mdist, qcodes, kcodes,
        *margs[1:], *parts, probs, True, CHUNK,
    )  # fmt: skip
    output, probs_t = pl.merge_parts(parts, margs[0], probs, tiers_np, (nbatch, heads, tokens, dim), query.dtype, CHUNK)
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
    *,
    bits: int | None = None,
    min_votes: int = 0,
    spatial_step: int = 0,
    temporal: torch.Tensor | None = None,
    temporal_step: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Fused decode step: Hamming distances, calibration, tiers and tiered attention.

    Equals the reference chain of :func:`dashkv.attention.tiered_step` from the query codes on::

        raw = hamming_distance(qc, kc)
        spatial = select_smallest(raw, visible & ~always, k_high, 0, bits).sum(1) >= min_votes
        dist, lo = calibrate(raw, spatial, temporal, spatial_step, temporal_step)
        tiers = assign_tiers(dist, visible, always, k_high, k_mid, lo, bits)
        tiered_attention(q, K, V, tiers, scaling, mid with dist=raw)

    without materialising distances, tiers or probabilities as ``[B, H, T, S]`` tensors: one parallel
    pass computes the raw distances (one byte a key and query head) and their per-chunk histograms,
    an optional second one the votes, the per-key offsets and the calibrated histograms, a last one
    picks each chunk's high and mid keys and attends to them.

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
    bits : int or None -- top of the distance range (``hi``); default ``64 W``
    min_votes : int -- cross-head consensus: votes (of all ``H`` heads) a key needs for the spatial
        discount; 0 turns consensus off
    spatial_step, temporal_step : int, ``<= 0`` -- the discounts in whole bits
    temporal : Tensor[B, 1, T, S] bool or None -- the momentum mask

    Returns
    -------
    output : Tensor[B, H, T, D], query's dtype
    probs : Tensor[B, H, T, S] float32 or None
    tiers : Tensor[B, H, T, S] int8 or None
    """
    pl.check_cpu(query, key, value, query_codes, key_codes)
    nbatch, heads, tokens, dim = query.shape
    kheads, seq = key.shape[1], key.shape[2]
    words = query_codes.shape[-1]
    shape = (nbatch, heads, tokens, seq)
    if seq == 0:  # as the reference steps: empty weights and tiers, zero output
        empty = torch.zeros(shape)
        return torch.zeros_like(query), empty if return_probs else None, empty.to(torch.int8) if return_tiers else None
    if tuple(query_codes.shape[:3]) != shape[:3] or key_codes.shape[:3] != key.shape[:3]:
        raise ValueError("codes do not match query / key shapes")
    if spatial_step > 0 or temporal_step > 0:
        raise ValueError(f"discounts must be <= 0, got spatial_step={spatial_step}, temporal_step={temporal_step}")
    if isinstance(k_high, float) != isinstance(k_mid, float):
        raise ValueError("k_high and k_mid must both be fractions (float) or both key counts (tensors)")
    hi = 64 * words if bits is None else int(bits)
    qc = pl.codes_array(query_codes)
    kc = pl.codes_array(key_codes).reshape(math.prod(key_codes.shape[:3]), words)
    keys, vals, half = pl.kv_arrays(key, value, heads)
    q = pl.as_numpy(query.detach().to(torch.float32)).reshape(-1, dim)
    vis_t = visible if visible is not None else torch.ones(1, 1, 1, seq, dtype=torch.bool)
    code, cdims = pl.mask_array(pl.codes_of(vis_t, always), shape, "visible / always")
    rows = nbatch * heads * tokens
    nch = -(-seq // CHUNK)
    nb = hi + 1  # raw distances 0..hi
    dist = pl.scratch("dist", (rows, seq), pl.dist_dtype(words))
    hist = pl.scratch("hist", (rows, nch, nb + 4), np.int32)
    fused.distance_kernel(qc, kc, kheads, seq, code, cdims, nb, dist, hist, CHUNK)
    if isinstance(k_high, float):  # fractions, as DashKVConfig.high / .mid: k_mid = k(high + mid) - k(high)
        eligible = hist[:, :, : nb + 3].sum(axis=(1, 2), dtype=np.int64)
        kh = pl.budget_counts_np(eligible, k_high)
        km = pl.budget_counts_np(eligible, k_high + k_mid) - kh
    else:
        kh, km = pl.rows_of(k_high, shape), pl.rows_of(k_mid, shape)
    votes_on = min_votes > 0 and spatial_step != 0
    time_on = temporal is not None and temporal_step != 0
    lo = (spatial_step if votes_on else 0) + (temporal_step if time_on else 0)
    off = np.zeros((1, 1), np.int8)
    if votes_on or time_on:
        thr, need, tie_base = thresholds(hist, kh, 0, nb)
        tmask = np.zeros((1, 1), np.uint8)
        if time_on:
            tmask = pl.as_numpy(temporal.to(torch.bool).expand(nbatch, 1, tokens, seq)).reshape(-1, seq).view(np.uint8)
        nb = hi - lo + 1
        off = pl.scratch("off", (nbatch * tokens, seq), np.int8)
        raw_hist, hist = hist, pl.scratch("hist_cal", (rows, nch, nb + 4), np.int32)
        fused.calibrate_kernel(
            dist, code, cdims, heads, tokens, thr, need, tie_base, int(min_votes) if votes_on else 0,
            int(spatial_step), tmask, time_on, int(temporal_step), off, lo, nb, raw_hist, hist, CHUNK,
        )  # fmt: skip
    th_h, nd_h, tb_h = thresholds(hist, kh, lo, nb)
    th_m, nd_m, tb_m = thresholds(hist, kh + km, lo, nb)
    margs = pl.mid_arrays(mid, (nbatch, heads, tokens), tuple(key.shape[:3]), words)
    parts = pl.new_parts(rows, seq, dim, CHUNK)
    want_tiers = return_tiers or return_probs  # normalising probs needs each key's tier
    probs = np.empty((rows, seq) if return_probs else (1, 1), np.float32)
    tiers = np.empty((rows, seq) if want_tiers else (1, 1), np.int8)
    fused.attend_kernel(
        q, qc, kc, dist, off, votes_on or time_on, keys, vals, half, kheads, seq, code, cdims,
        np.float32(scaling), th_h, nd_h, tb_h, th_m, nd_m, tb_m, *margs,
        *parts, probs, return_probs, tiers, want_tiers, CHUNK,
    )  # fmt: skip
    output, probs_t = pl.merge_parts(
        parts, margs[0], probs if return_probs else None, tiers, (nbatch, heads, tokens, dim), query.dtype, CHUNK
    )
    tiers_t = torch.from_numpy(tiers).view(shape) if return_tiers else None
    return output, probs_t, tiers_t
