"""Public functions of the CPU backend: the reference signatures plus the fused :func:`dash_attention`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from dashkv.ops.cpu import fused, plumbing as pl
from typing import NamedTuple

from dashkv.ops.cpu.attend import attn_tiers_kernel, scale_probs
from dashkv.ops.cpu.step import momentum_rows, step_kernel
from dashkv.ops.cpu.select import hamming_kernel, hist_kernel, select_kernel, thresholds, tiers_kernel
from dashkv.ops.reference import (
    MidTierInputs,
    MidTierWeights,
    StepInputs,
    StepOutputs,
    StepSettings,
    expand_kv,
)

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
        (kc,), stride = pl.key_rows(pl.check_codes(key_codes))
        hamming_kernel(pl.codes_array(query_codes), pl.as_numpy(kc), kheads, stride, out, CHUNK)
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
    (kc,), stride = pl.key_rows(pl.check_codes(key_codes))
    kc = pl.as_numpy(kc)
    nb = 64 * words + 1
    dist = np.empty((nbatch * heads * tokens, seq), pl.dist_dtype(64 * words))
    hist = np.empty((nbatch * heads * tokens, -(-seq // CHUNK), nb + 4), np.int32)

    def run() -> tuple[np.ndarray, np.ndarray]:
        fused.distance_kernel(qc, kc, kheads, seq, stride, code, cdims, nb, dist, hist, CHUNK, False)
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
    q = pl.as_numpy(query.detach().to(torch.float32)).reshape(-1, dim)
    tiers_np = pl.as_numpy(tiers.to(torch.int8).expand(nbatch, heads, tokens, seq)).reshape(-1, seq)
    rows = nbatch * heads * tokens
    if mid is not None:
        pl.check_cpu(mid.dist, mid.query_codes, mid.key_codes)
        mdist = pl.dist2d(mid.dist.expand(nbatch, heads, tokens, seq))
        qcodes = pl.codes_array(mid.query_codes)
        if mdist.dtype != np.int32:
            mdist = mdist.astype(np.int32)
        if mid.key_codes.shape[:3] != key.shape[:3] or mid.query_codes.shape[:3] != query.shape[:3]:
            raise ValueError("mid.query_codes / mid.key_codes do not match query / key shapes")
        knorm = pl.f32_keys(mid.key_norm, tuple(key.shape[:3]))
        keys, vals, kcodes, knorm, half, stride = pl.kv_arrays(key, value, heads, pl.check_codes(mid.key_codes), knorm)
        margs = pl.mid_arrays(mid, (nbatch, heads, tokens), knorm, qcodes.shape[-1])
    else:
        keys, vals, half, stride = pl.kv_arrays(key, value, heads)
        mdist = np.zeros((1, 1), np.int32)
        qcodes = np.zeros((nbatch, heads, tokens, 1), np.int64)
        kcodes = np.zeros((1, 1), np.int64)
        margs = pl.mid_arrays(None, (nbatch, heads, tokens), None, 1)
    parts = pl.new_parts(rows, seq, dim, CHUNK)
    probs = np.empty((rows, seq), np.float32)
    attn_tiers_kernel(
        q, keys, vals, half, kheads, seq, stride, tiers_np, np.float32(scaling), margs[0], mdist, qcodes, kcodes,
        *margs[1:], *parts, probs, True, CHUNK,
    )  # fmt: skip
    output, factor = pl.merge_parts(parts, margs[0], (nbatch, heads, tokens, dim), query.dtype)
    scale_probs(probs, tiers_np, factor, CHUNK)
    return output, torch.from_numpy(probs).view(nbatch, heads, tokens, seq)


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
    share: str = "head",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Fused decode step: Hamming distances, calibration, tiers and tiered attention.

    Equals the reference chain of :func:`dashkv.ops.reference.decode_step` from the query codes on::

        raw = hamming_distance(qc, kc)                      # share="group": group_distance(raw, Hkv)
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
    key, value : Tensor[B, Hkv, S, D] (views with a head stride, as a growing cache's, are read in place)
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
    bits : int or None -- top of one head's distance range; default ``64 W``
    min_votes : int -- cross-head consensus: votes (of all ``H`` heads, or ``Hkv`` groups) a key needs
        for the spatial discount; 0 turns consensus off
    spatial_step, temporal_step : int, ``<= 0`` -- the discounts in whole bits of one head's distance
    temporal : Tensor[B, 1, T, S] bool or None -- the momentum mask
    share : ``"head"`` or ``"group"`` (tiers per KV head from the group's summed distances; masks
        must then be the same for every query head)

    Returns
    -------
    output : Tensor[B, H, T, D], query's dtype
    probs : Tensor[B, H, T, S] float32 or None
    tiers : Tensor[B, H, T, S] int8 or None
    """
    if isinstance(k_high, float) != isinstance(k_mid, float):
        raise ValueError("k_high and k_mid must both be fractions (float) or both key counts (tensors)")
    tmask = None
    if temporal is not None:
        tmask = pl.as_numpy(temporal.to(torch.bool).expand(query.shape[0], 1, query.shape[2], key.shape[2]))
        tmask = tmask.reshape(-1, key.shape[2]).view(np.uint8)
    step = FusedStep(k_high, k_mid, bits, min_votes, spatial_step, tmask, temporal_step, share)
    out = _fused(query, key, value, query_codes, key_codes, scaling, visible, always, mid, step,
                 return_probs, return_tiers, None)  # fmt: skip
    return out.output, out.probs, out.tiers


_MASKS: list[tuple] = []  # the last few masks' rows: every layer of a forward passes the same mask tensors


def _mask_rows(visible, always, shape, heads, group):
    """Key visibility bytes of the masks as kernel rows (:func:`plumbing.mask_array`), and the number
    of visible (query head, token, key) triples; kept for the masks of the last few calls, since all
    layers of a forward share them (a hit needs the very same tensor objects, unmodified)."""
    for entry in _MASKS:
        if entry[0] is visible and entry[1] is always and entry[2] == (shape, heads) and entry[3] == (
            visible is None or visible._version, always is None or always._version
        ):
            return entry[4]
    vis_t = visible if visible is not None else torch.ones(1, 1, 1, shape[3], dtype=torch.bool)
    codes_t = pl.codes_of(vis_t, always)
    if group and codes_t.dim() == 4 and codes_t.shape[1] > 1 and codes_t.stride(1) != 0:
        raise ValueError("share='group' needs visible / always masks shared by all query heads ([B, 1, T, S])")
    code, cdims = pl.mask_array(codes_t, shape, "visible / always")
    rows = (code, cdims, int(pl.visible_count(code, cdims, (shape[0], heads, shape[2]))))
    versions = (visible is None or visible._version, always is None or always._version)
    _MASKS.insert(0, (visible, always, (shape, heads), versions, rows))
    del _MASKS[4:]
    return rows


_VISIBLE: list[tuple] = []  # the last mask's rows, shared by the layers of a forward


def _visible_rows(visible: torch.Tensor, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``visible [B, 1, T, S]`` as bool rows ``[B*T, S]`` and each row's visible count ``[B*T, 1]``
    (float32, at least 1: torch multiplies a float32 prior by the count in float32)."""
    if _VISIBLE and _VISIBLE[0][0] is visible and _VISIBLE[0][1] == (visible._version, shape):
        return _VISIBLE[0][2]
    nbatch, tokens, seq = shape
    rows = pl.as_numpy(visible.expand(nbatch, 1, tokens, seq)).reshape(-1, seq)
    count = np.maximum(np.count_nonzero(rows, axis=1), 1).astype(np.float32).reshape(-1, 1)
    _VISIBLE[:] = [(visible, (visible._version, shape), (rows, count))]
    return rows, count


class FusedStep(NamedTuple):
    """Settings of one fused call (see :func:`dash_attention`); ``temporal`` is the momentum mask as
    ``[B*T, S]`` uint8 rows, or None."""

    k_high: torch.Tensor | float
    k_mid: torch.Tensor | float
    bits: int | None
    min_votes: int
    spatial_step: int
    temporal: np.ndarray | None
    temporal_step: int
    share: str


class PriorUpdate(NamedTuple):
    """The momentum prior to update in the same call: ``prior [B*T, S]`` float32 rows or None, ``decay``."""

    prior: np.ndarray | None
    decay: float


def _fused(query, key, value, query_codes, key_codes, scaling, visible, always, mid, step: FusedStep,
           return_probs, return_tiers, prior: PriorUpdate | None, center=None) -> StepOutputs:  # fmt: skip
    # center: the key centres [Hkv, D] float32 when mid's query_norm / query_dot_center are None (the
    # compiled step computes them)
    pl.check_cpu(query, key, value, query_codes, key_codes)
    nbatch, heads, tokens, dim = query.shape
    kheads, seq = key.shape[1], key.shape[2]
    words = query_codes.shape[-1]
    shape = (nbatch, heads, tokens, seq)
    group = step.share == "group"
    if step.share not in ("head", "group"):
        raise ValueError(f"share={step.share!r} is not supported; choose 'head' or 'group'")
    if seq == 0:  # as the reference steps: empty weights and tiers, zero output
        empty = torch.zeros(shape)
        return StepOutputs(
            torch.zeros_like(query), torch.zeros(3, dtype=torch.int64),
            torch.zeros(nbatch, tokens, 0) if prior is not None else None,
            empty if return_probs else None, empty.to(torch.int8) if return_tiers else None,
        )  # fmt: skip
    if tuple(query_codes.shape[:3]) != shape[:3] or key_codes.shape[:3] != key.shape[:3]:
        raise ValueError("codes do not match query / key shapes")
    if step.spatial_step > 0 or step.temporal_step > 0:
        raise ValueError(
            f"discounts must be <= 0, got spatial_step={step.spatial_step}, temporal_step={step.temporal_step}"
        )
    top = 64 * words if step.bits is None else int(step.bits)
    qc = pl.codes_array(query_codes)
    knorm = pl.f32_keys(mid.key_norm, tuple(key.shape[:3])) if mid is not None else None
    per_key = (pl.check_codes(key_codes),) + ((knorm,) if knorm is not None else ())
    keys, vals, kc, *rest, half, stride = pl.kv_arrays(key, value, heads, *per_key)
    q = pl.as_numpy(query.detach().to(torch.float32)).reshape(-1, dim)
    sel_heads = kheads if group else heads
    code, cdims, visible_total = _mask_rows(visible, always, (nbatch, sel_heads, tokens, seq), heads, group)
    fractions = isinstance(step.k_high, float)
    if fractions:
        kh = km = _NO_ROWS
    else:
        kh, km = pl.rows_of(step.k_high, shape), pl.rows_of(step.k_mid, shape)
        if group:  # per selection row: the counts of each group's first head
            kh = kh.reshape(nbatch, kheads, heads // kheads, tokens)[:, :, 0].reshape(-1)
            km = km.reshape(nbatch, kheads, heads // kheads, tokens)[:, :, 0].reshape(-1)
    scale = heads // kheads if group else 1
    dist = pl.scratch("dist", (nbatch * sel_heads * tokens, seq), pl.dist_dtype(top * scale))
    calibrating = step.spatial_step != 0 or step.temporal is not None
    off_dtype = np.int16 if group else np.int8
    off = pl.scratch("off", (nbatch * tokens, seq), off_dtype) if calibrating else np.zeros((1, 1), off_dtype)
    margs = pl.mid_arrays(mid, (nbatch, heads, tokens), rest[0] if rest else None, words)
    out = np.empty((nbatch * heads * tokens, dim), np.float32)
    want_prior = prior is not None
    has_prior = want_prior and prior.prior is not None
    counts, prior_np, probs, tiers = step_kernel(
        q, qc, kc, keys, vals, half, kheads, seq, stride, code, cdims, visible_total,
        fractions, float(step.k_high) if fractions else 0.0, float(step.k_mid) if fractions else 0.0, kh, km,
        top, group, np.float32(scaling), int(step.min_votes), int(step.spatial_step),
        step.temporal if step.temporal is not None else _NO_MASK, step.temporal is not None, int(step.temporal_step), off,
        margs[0], margs[2], _NO_CENTER if center is None else center, margs[1], margs[3], *margs[4:],
        prior.prior if has_prior else _NO_PRIOR, has_prior, prior.decay if want_prior else 0.0, want_prior,
        return_probs, return_tiers, dist, out, CHUNK,
    )  # fmt: skip
    output = torch.from_numpy(out).view(nbatch, heads, tokens, dim)
    output = output if query.dtype == torch.float32 else output.to(query.dtype)
    prior_t = torch.from_numpy(prior_np).view(nbatch, tokens, seq) if want_prior else None
    probs_t = torch.from_numpy(probs).view(shape) if return_probs else None
    tiers_t = None
    if return_tiers:
        tiers_t = torch.from_numpy(tiers).view(nbatch, sel_heads, tokens, seq)
        tiers_t = expand_kv(tiers_t, heads) if group else tiers_t
    return StepOutputs(output, torch.from_numpy(counts), prior_t, probs_t, tiers_t)


_NO_ROWS = np.zeros(1, np.int64)
_NO_MASK = np.zeros((1, 1), np.uint8)
_NO_CENTER = np.zeros((1, 1), np.float32)
_NO_PRIOR = np.zeros((1, 1), np.float32)


def decode_step(inputs: StepInputs, settings: StepSettings, mid: MidTierWeights | None) -> StepOutputs:
    """The whole DASH-KV step of one layer in one fused call (see :func:`dashkv.ops.reference.decode_step`)."""
    q = inputs.query
    nbatch, _, tokens, _ = q.shape
    seq = inputs.key.shape[2]
    mid_inputs = center = None
    if mid is not None and settings.mid > 0:  # |q| and q . mu are computed in the compiled step
        center = pl.as_numpy(mid.key_center.detach().to(torch.float32)).reshape(inputs.key.shape[1], -1)
        mid_inputs = MidTierInputs(
            None, None, None, settings.bits, None, inputs.key_norms, None, mid.temperature, mid.bias, mid.residual
        )
    prior = None
    if inputs.prior is not None:
        prior = pl.as_numpy(inputs.prior.detach().to(torch.float32)).reshape(nbatch * tokens, seq)
    tmask = None
    if prior is not None and settings.temporal_step != 0:  # momentum: dashkv.calibration.momentum_mask
        vis, count = _visible_rows(inputs.visible, (nbatch, tokens, seq))
        tmask = momentum_rows(prior, vis, count, settings.momentum_ratio)
    step = FusedStep(float(settings.high), float(settings.mid), settings.bits, settings.min_votes,
                     settings.spatial_step, tmask, settings.temporal_step, settings.share)  # fmt: skip
    update = PriorUpdate(prior, settings.momentum_decay) if settings.want_prior else None
    return _fused(q, inputs.key, inputs.value, inputs.query_codes, inputs.key_codes, settings.scaling,
                  inputs.visible, inputs.always, mid_inputs, step, settings.want_weights, settings.want_weights,
                  update, center)  # fmt: skip
