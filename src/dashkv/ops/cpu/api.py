"""The per-op functions of the CPU backend (the decode step itself: :mod:`~dashkv.ops.cpu.layer`).

Signature twins of :mod:`dashkv.ops.reference` (the ``Backend`` contract of :mod:`dashkv.ops.dispatch`):
their docstrings and argument checks repeat on purpose.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from dashkv.ops.cpu import fused
from dashkv.ops.cpu import views as vw
from dashkv.ops.cpu.attend import attn_tiers_kernel, merge_kernel, scale_probs
from dashkv.ops.cpu.plan import NO_MID
from dashkv.ops.cpu.select import (
    block_distance_kernel, hamming_kernel, hist_kernel, select_kernel, thresholds, tiers_kernel,
)
from dashkv.ops.cpu.step import MidTier, Partials
from dashkv.ops.cpu.tables import cos_table, residual_tables
from dashkv.ops.reference import MidTierInputs

CHUNK = 2048
"""Keys per task: a chunk's K and V (0.5 MiB each at D = 64 in fp32) stay in L2 for the GQA group."""


def hamming_distance(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    """Packed Hamming distance ``[B, H, T, S]`` int32 (see :func:`dashkv.ops.reference.hamming_distance`)."""
    vw.check_cpu(query_codes, key_codes)
    nbatch, heads, tokens, words = query_codes.shape
    kb, kheads, seq, kw = key_codes.shape
    if kw != words or heads % kheads or kb not in (1, nbatch):
        raise ValueError(f"codes {tuple(query_codes.shape)} and {tuple(key_codes.shape)} do not match")
    out = np.empty((nbatch * heads * tokens, seq), np.int32)
    if out.size:
        (kc,), stride = vw.key_rows(vw.check_codes(key_codes))
        hamming_kernel(vw.codes_array(query_codes), vw.as_numpy(kc), kheads, stride, out, CHUNK)
    return torch.from_numpy(out).view(nbatch, heads, tokens, seq)


def block_distance(query_codes: torch.Tensor, key_codes: torch.Tensor, block: int) -> torch.Tensor:
    """Smallest distance of each key to a query block's codes ``[B, Hkv, blocks, S]`` int32 (see
    :func:`dashkv.ops.reference.block_distance`)."""
    vw.check_cpu(query_codes, key_codes)
    nbatch, heads, tokens, words = query_codes.shape
    kb, kheads, seq, kw = key_codes.shape
    if kw != words or heads % kheads or kb not in (1, nbatch) or block < 1:
        raise ValueError(f"codes {tuple(query_codes.shape)} and {tuple(key_codes.shape)} (block {block}) do not match")
    blocks = -(-tokens // block)
    out = np.empty((nbatch * kheads * blocks, seq), np.int32)
    if out.size:
        (kc,), stride = vw.key_rows(vw.check_codes(key_codes))
        block_distance_kernel(vw.codes_array(query_codes), vw.as_numpy(kc), kheads, stride, block, out)
    return torch.from_numpy(out).view(nbatch, kheads, blocks, seq)


def _histogram(dist, vis_bytes, lo, hi):
    if hi < lo:
        raise ValueError(f"empty distance range [{lo}, {hi}]")
    d2 = vw.dist2d(dist)
    vis, vdims = vw.mask_array(vis_bytes, tuple(dist.shape), "eligible")
    return d2, vis, vdims, hist_kernel(d2, vis, vdims, int(lo), int(hi) - int(lo) + 1, CHUNK)


def code_scan_plan(
    query_codes: torch.Tensor, key_codes: torch.Tensor
) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """The first pass of :func:`dash_attention` alone, for benchmarks: checks and views made once
    (a plan), the returned function runs the pass and returns the raw distances ``[B*H*T, S]`` (uint8
    for up to 3 words) and the per (row, chunk) histograms, every key visible and eligible.

    Parameters
    ----------
    query_codes : Tensor[B, H, T, W], int64
    key_codes : Tensor[B, Hkv, S, W], int64
    """
    vw.check_cpu(query_codes, key_codes)
    nbatch, heads, tokens, words = query_codes.shape
    kheads, seq = key_codes.shape[1], key_codes.shape[2]
    vis, vdims = vw.mask_array(torch.ones(1, 1, 1, seq, dtype=torch.uint8), (nbatch, heads, tokens, seq), "codes")
    qc = vw.codes_array(query_codes)
    (kc,), stride = vw.key_rows(vw.check_codes(key_codes))
    rows = vw.KeyRows(np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32), vw.as_numpy(kc),
                      np.zeros(1, np.float32), 0, kheads, seq, stride)  # fmt: skip
    masks = vw.MaskRows(vis, vdims, 0)
    bins = 64 * words + 1  # raw distances 0..64 W
    dist = np.empty((nbatch * heads * tokens, seq), vw.dist_dtype(64 * words))
    hist = np.empty((nbatch * heads * tokens, -(-seq // CHUNK), bins + 4), np.int32)

    def run() -> tuple[np.ndarray, np.ndarray]:
        fused.distance_kernel(qc, rows, masks, bins, dist, hist, CHUNK, False)
        return dist, hist

    return run


def kth_smallest(dist: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The k-th smallest eligible distance per row ``[B, H, T]`` int64 (see the reference)."""
    vw.check_cpu(dist, eligible, k)
    _, _, _, hist = _histogram(dist, eligible.to(torch.bool).to(torch.uint8), lo, hi)
    thr, _, _ = thresholds(hist, vw.rows_of(k, dist.shape), int(lo), int(hi) - int(lo) + 1)
    return torch.from_numpy(thr).view(dist.shape[:3])


def select_smallest(dist: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Exactly ``min(k, n)`` eligible keys of smallest distance per row, ties to later positions."""
    vw.check_cpu(dist, eligible, k)
    d2, vis, vdims, hist = _histogram(dist, eligible.to(torch.bool).to(torch.uint8), lo, hi)
    thr, need, tie_base = thresholds(hist, vw.rows_of(k, dist.shape), int(lo), int(hi) - int(lo) + 1)
    out = np.empty(d2.shape, np.bool_)
    select_kernel(d2, vis, vdims, thr, need, tie_base, out, CHUNK)
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
    vw.check_cpu(dist, visible, always)
    shape = tuple(dist.shape)
    d2, vis, vdims, hist = _histogram(dist, vw.visibility_bytes(visible, always), lo, hi)
    bins = int(hi) - int(lo) + 1
    kh = torch.as_tensor(k_high)
    th_h, nd_h, tb_h = thresholds(hist, vw.rows_of(kh, shape), int(lo), bins)
    th_m, nd_m, tb_m = thresholds(hist, vw.rows_of(kh + torch.as_tensor(k_mid), shape), int(lo), bins)
    out = np.empty(d2.shape, np.int8)
    tiers_kernel(d2, vis, vdims, th_h, nd_h, tb_h, th_m, nd_m, tb_m, out, CHUNK)
    return torch.from_numpy(out).view(shape)


def _f32_rows(t, shape: tuple[int, ...]) -> np.ndarray:
    """``t`` broadcast to ``shape`` as a flat float32 array (a view when it already is one)."""
    t = torch.as_tensor(t).detach()
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    if tuple(t.shape) != shape:
        t = t.expand(shape)
    return vw.as_numpy(t).reshape(-1)


def given_mid_tier(mid: MidTierInputs, query_shape: tuple[int, int, int], words: int) -> MidTier:
    """:class:`MidTier` of per-op mid-tier inputs: the query norms and ``q . mu`` are given."""
    heads = query_shape[1]
    bits = int(mid.bits)
    if bits < 1 or bits > 64 * words or words > 2:
        raise ValueError(f"mid tier needs 1..{64 * words} bits in at most 2 words, got bits={bits}")
    tab, sumphi = residual_tables(mid.residual, heads, bits)
    return MidTier(
        True, NO_MID.center, _f32_rows(mid.query_norm, query_shape), _f32_rows(mid.query_dot_center, query_shape),
        _f32_rows(mid.temperature, (heads,)), _f32_rows(mid.bias, (heads,)), tab, sumphi, cos_table(bits), bits,
    )  # fmt: skip


def _merge(parts: Partials, mid_on: bool, shape: tuple[int, int, int, int], dtype):
    """Merge the partials into ``[B, H, T, D]`` in ``dtype``; also returns each partial's normalised
    weight ``factor [rows, chunks, 2]`` (the scale of the chunk's unnormalised high / mid weights)."""
    nbatch, heads, tokens, dim = shape
    out = np.empty((nbatch * heads * tokens, dim), np.float32)
    factor = np.empty(parts.m.shape, np.float64)
    merge_kernel(parts.m, parts.l, parts.acc, parts.gap, parts.nhigh, mid_on, out, factor)
    output = torch.from_numpy(out).view(nbatch, heads, tokens, dim)
    return (output if dtype == torch.float32 else output.to(dtype)), factor


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
    vw.check_cpu(query, key, value, tiers)
    nbatch, heads, tokens, dim = query.shape
    seq = key.shape[2]
    if seq == 0:  # the reference's softmax over no keys: empty weights, zero output
        return torch.zeros_like(query), torch.zeros(nbatch, heads, tokens, 0)
    q = vw.as_numpy(query.detach().to(torch.float32)).reshape(-1, dim)
    tiers_np = vw.as_numpy(tiers.to(torch.int8).expand(nbatch, heads, tokens, seq)).reshape(-1, seq)
    rows = nbatch * heads * tokens
    if mid is not None:
        vw.check_cpu(mid.dist, mid.query_codes, mid.key_codes)
        mdist = vw.dist2d(mid.dist.expand(nbatch, heads, tokens, seq))
        qcodes = vw.codes_array(mid.query_codes)
        if mdist.dtype != np.int32:
            mdist = mdist.astype(np.int32)
        if mid.key_codes.shape[:3] != key.shape[:3] or mid.query_codes.shape[:3] != query.shape[:3]:
            raise ValueError("mid.query_codes / mid.key_codes do not match query / key shapes")
        kv = vw.layer_rows(key, value, heads, mid.key_codes, mid.key_norm)
        tier = given_mid_tier(mid, (nbatch, heads, tokens), qcodes.shape[-1])
    else:
        kv = vw.layer_rows(key, value, heads)
        mdist = np.zeros((1, 1), np.int32)
        qcodes = np.zeros((nbatch, heads, tokens, 1), np.int64)
        tier = NO_MID
    nch = max(1, -(-seq // CHUNK))
    unused = np.zeros((1, 1), np.int64)  # partials only the fused step reads
    parts = Partials(np.empty((rows, nch, 2), np.float32), np.empty((rows, nch, 2), np.float64),
                     np.empty((rows, nch, 2, dim), np.float32), np.empty((rows, nch), np.float64),
                     np.empty((rows, nch), np.int64), unused, unused, unused, np.zeros((1, 1), np.float32))  # fmt: skip
    probs = np.empty((rows, seq), np.float32)
    attn_tiers_kernel(q, kv, tiers_np, np.float32(scaling), tier, mdist, qcodes, parts, probs, True, CHUNK)
    output, factor = _merge(parts, tier.on, (nbatch, heads, tokens, dim), query.dtype)
    scale_probs(probs, tiers_np, factor, CHUNK)
    return output, torch.from_numpy(probs).view(nbatch, heads, tokens, seq)


__all__ = [
    "CHUNK", "assign_tiers", "code_scan_plan", "given_mid_tier", "hamming_distance", "kth_smallest",
    "select_smallest", "tiered_attention",
]  # fmt: skip
