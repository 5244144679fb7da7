"""Public functions of the Triton backend: the signatures of :mod:`dashkv.ops.reference`, on CUDA tensors.

Signature twins of the reference and of :mod:`dashkv.ops.cpu.api` / :mod:`~dashkv.ops.cpu.layer` (the ``Backend`` contract of
:mod:`dashkv.ops.dispatch`): their docstrings and argument checks repeat on purpose."""

from __future__ import annotations

import functools
import math

import torch
import triton

from dashkv.ops.reference import (
    LayerPlan,
    MidTierInputs,
    MidTierWeights,
    StepInputs,
    StepOutputs,
    StepSettings,
    attend_over_tiers,
    code_new_keys,
    expand_kv,
    plan_layer,  # noqa: F401 - the reference's plan: nothing to prepare on the GPU
    union_tiers,
)
from dashkv.config import SHARING, check_choice
from dashkv.ops.triton import common
from dashkv.ops.triton.attend import attend_kernel, merge_kernel, weights_kernel
from dashkv.ops.triton.common import BLOCK_M, pow2
from dashkv.ops.triton.encode import encode_key, encode_query
from dashkv.ops.triton.launch import check_device, interpreting
from dashkv.ops.triton.scan import dense_hist_kernel, scan_kernel
from dashkv.ops.triton.select import calibrate_kernel, dense_select_kernel, thresholds_kernel

WEIGHTS_BLOCK = 1024  # keys per program of the weights kernel


@functools.lru_cache(maxsize=64)
def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element stand-in for a pointer argument a kernel's constexpr flags leave unread."""
    return torch.zeros(1, dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _fractions(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Budget fractions and the reference's rounding epsilon as a float64 device tensor (kept: no copy a call)."""
    return torch.tensor((*values, 1e-9), dtype=torch.float64, device=device)


@functools.lru_cache(maxsize=16)
def _cos_table(bits: int, device: torch.device) -> torch.Tensor:
    """``cos(pi * d / R)`` for ``d = 0..R``, as the reference computes it (fp32 torch)."""
    return torch.cos(math.pi * torch.arange(bits + 1, dtype=torch.float32) / bits).to(device)


def _chunking(seq: int) -> tuple[int, int, int]:
    """``(chunk, sub-block, chunks)``: the chunk is read at call time, so tests can shrink it."""
    chunk = int(common.CHUNK)
    return chunk, min(int(common.BLOCK), chunk), max(1, triton.cdiv(seq, chunk))


def _codes(visible: torch.Tensor, always: torch.Tensor | None, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """One byte per key, broadcast (zero strides) to ``shape``: 0 hidden, 1 eligible, 2 always high."""
    visible = visible.to(torch.bool)
    code = visible.to(torch.uint8)
    if always is not None:
        code = code + (visible & always.to(torch.bool)).to(torch.uint8)
    while code.dim() < 4:
        code = code.unsqueeze(0)
    try:
        code = code.expand(shape)
    except RuntimeError:
        raise ValueError(f"masks of shape {tuple(visible.shape)} do not broadcast to {shape}") from None
    # size-1 dims keep their stride under expand; the kernels index the mask by query head: zero it
    return code.as_strided(shape, [0 if n == 1 else st for n, st in zip(shape, code.stride())])


_MASKS: list[tuple] = []  # the last few masks' byte codes: every layer of a forward passes the same masks


def _step_masks(visible, always, shape):
    """``(codes, visible count per (b, t) [B*T] float32 >= 1, visible total)`` of a step's masks, kept
    for the very same, unmodified mask tensors (all layers of a forward share them)."""
    versions = (visible._version, None if always is None else always._version)
    for entry in _MASKS:
        if entry[0] is visible and entry[1] is always and entry[2] == (shape, versions):
            return entry[3]
    if visible.dim() != 4 or visible.shape[1] != 1 or (always is not None and (always.dim() != 4 or always.shape[1] != 1)):
        raise ValueError(
            f"visible / always must be [B, 1, T, S], got {tuple(visible.shape)} / "
            f"{None if always is None else tuple(always.shape)}"
        )
    code = _codes(visible, always, shape)
    per_row = visible.expand(shape[0], 1, shape[2], shape[3]).sum(-1).reshape(-1)
    rows = (code, per_row.clamp(min=1).to(torch.float32), per_row.sum())
    _MASKS.insert(0, (visible, always, (shape, versions), rows))
    del _MASKS[4:]
    return rows


def _thresholds(hist: torch.Tensor, lo: int, nv: int, ks: torch.Tensor | None = None, fractions: tuple = ()):
    """Thresholds, needed ties and tie bases ``[NK, rows]``, ``[NK, rows]``, ``[NK, rows, chunks]`` of
    per-chunk histograms ``[rows, chunks, bins]``, for key counts ``ks [NK, rows]`` or budget fractions."""
    rows, nch, nbp = hist.shape
    nk = ks.shape[0] if ks is not None else len(fractions)
    device = hist.device
    thr = torch.empty(nk, rows, dtype=torch.int32, device=device)
    need = torch.empty(nk, rows, dtype=torch.int32, device=device)
    tie_base = torch.empty(nk, rows, nch, dtype=torch.int32, device=device)
    frac = _fractions(tuple(float(f) for f in fractions), device) if ks is None else _dummy(device, torch.float64)
    thresholds_kernel[(rows,)](
        hist, ks if ks is not None else _dummy(device, torch.int64), frac, thr, need, tie_base, rows, nch, lo, nv,
        NK=nk, FROM_FRACTION=ks is None, NBP=nbp, CB=max(2, min(pow2(nch), 16384 // nbp)),
    )  # fmt: skip
    return thr, need, tie_base


# --------------------------------------------------------------------------------- public API


def hamming_distance(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    """Packed Hamming distance ``[B, H, T, S]`` int32 (see :func:`dashkv.ops.reference.hamming_distance`)."""
    check_device(query_codes=query_codes, key_codes=key_codes)
    nbatch, heads, tokens, words = query_codes.shape
    kb, kheads, seq, kw = key_codes.shape
    if kw != words or heads % kheads or kb not in (1, nbatch) or query_codes.dtype != torch.int64:
        raise ValueError(f"codes {tuple(query_codes.shape)} and {tuple(key_codes.shape)} do not match (int64 words)")
    out = torch.empty(nbatch, heads, tokens, seq, dtype=torch.int32, device=query_codes.device)
    if out.numel() == 0:
        return out
    chunk, _, nch = _chunking(seq)
    key_codes = key_codes.expand(nbatch, kheads, seq, words)
    u8 = _dummy(out.device, torch.uint8)
    scan_kernel[(nbatch * kheads, nch)](
        query_codes, *query_codes.stride(), key_codes, *key_codes.stride(), u8, 0, 0, 0, 0, out,
        _dummy(out.device, torch.int32), heads, kheads, tokens, seq, nch,
        W=words, CHUNK=chunk, NBP=2, GROUP=False, WANT_HIST=False,
    )  # fmt: skip
    return out


def _dense_selection(dist, code, ks, lo, hi, tiers: bool) -> torch.Tensor:
    if dist.dim() != 4 or dist.dtype.is_floating_point or dist.dtype == torch.bool:
        raise ValueError("dist must be an integer tensor [B, H, T, S]")
    if hi < lo:
        raise ValueError(f"empty distance range [{lo}, {hi}]")
    nbatch, heads, tokens, seq = dist.shape
    rows = nbatch * heads * tokens
    out = torch.empty(dist.shape, dtype=torch.int8, device=dist.device)
    if out.numel() == 0:
        return out
    dist = dist.contiguous()
    chunk, _, nch = _chunking(seq)
    nv = int(hi) - int(lo) + 1
    hist = torch.empty(rows, nch, pow2(nv, 2), dtype=torch.int32, device=dist.device)
    dense_hist_kernel[(rows, nch)](dist, code, *code.stride(), hist, heads, tokens, seq, nch, int(lo), nv,
                                   CHUNK=chunk, NBP=hist.shape[2])  # fmt: skip
    thr, need, tie_base = _thresholds(hist, int(lo), nv, ks=ks)
    dense_select_kernel[(rows, nch)](dist, code, *code.stride(), thr, need, tie_base, out, heads, tokens, seq, nch,
                                     rows, TIERS=tiers, CHUNK=chunk)  # fmt: skip
    return out


def _row_counts(k: torch.Tensor, shape: tuple[int, ...], device) -> torch.Tensor:
    return torch.as_tensor(k, device=device).to(torch.int64).expand(*shape[:3]).reshape(-1)


def select_smallest(dist: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Exactly ``min(k, n)`` eligible keys of smallest distance per row, ties to later positions."""
    check_device(dist=dist, eligible=eligible)
    code = _codes(eligible, None, tuple(dist.shape))
    ks = _row_counts(k, dist.shape, dist.device).unsqueeze(0).contiguous()
    return _dense_selection(dist, code, ks, lo, hi, tiers=False).view(torch.bool)


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
    check_device(dist=dist, visible=visible, always=always)
    shape = tuple(dist.shape)
    code = _codes(visible, always, shape)
    kh = _row_counts(k_high, shape, dist.device)
    ks = torch.stack([kh, kh + _row_counts(k_mid, shape, dist.device)]).contiguous()
    return _dense_selection(dist, code, ks, lo, hi, tiers=True)


class _Mid:
    """Flat mid-tier arguments of the attention kernel (dummies when the mid tier is off)."""

    def __init__(self, device, heads: int, qshape, key_norm=None, qnorm=None, qdc=None, temperature=None, bias=None,
                 residual=None, bits: int = 1):  # fmt: skip
        f32 = _dummy(device, torch.float32)
        self.on = key_norm is not None
        self.bits = int(bits)
        if not self.on:
            self.qn = self.qdc = self.temp = self.bias = self.phi = self.cos = f32
            self.kn, self.kn_strides = f32, (0, 0, 0)
            return
        as_f32 = lambda t: torch.as_tensor(t, device=device).to(torch.float32)  # noqa: E731
        self.qn = as_f32(qnorm).expand(qshape).contiguous()
        self.qdc = as_f32(qdc).expand(qshape).contiguous()
        self.kn = as_f32(key_norm)
        self.kn_strides = self.kn.stride()
        self.temp = as_f32(temperature).expand(heads).contiguous()
        self.bias = as_f32(bias).expand(heads).contiguous()
        self.phi = as_f32(residual).reshape(heads, -1)[:, : self.bits].contiguous()
        self.cos = _cos_table(self.bits, device)

    def args(self):
        return (self.qn, self.qdc, self.kn, *self.kn_strides, self.temp, self.bias, self.phi, self.cos)


def _attend(query, key, value, qc, kc, scaling: float, mid: _Mid, *, tiers_in=None, raw=None, dist=None, off=None, code=None,
            thr=None, need=None, tie_base=None, group=False, want_logits=False, tiers_out=None):  # fmt: skip
    """Run the attention and merge kernels; returns ``(output, top, sum, shift, logits, nh, nm)``."""
    nbatch, heads, tokens, dim = query.shape
    kheads, seq = key.shape[1], key.shape[2]
    device = query.device
    chunk, block, nch = _chunking(seq)
    rows = nbatch * heads * tokens
    srows = nbatch * (kheads if group else heads) * tokens
    words = qc.shape[-1]
    block_d = pow2(dim, 16)
    m_part = torch.empty(rows, nch, 2, dtype=torch.float32, device=device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(rows, nch, 2, block_d, dtype=torch.float32, device=device)
    gap_part = torch.empty(rows, nch, dtype=torch.float32, device=device)
    nh_part = torch.empty(rows, nch, dtype=torch.int32, device=device)
    nm_part = torch.empty_like(nh_part)
    logits = torch.empty(rows, seq, dtype=torch.float32, device=device) if want_logits else _dummy(device, torch.float32)
    i32, i16, i8, u8 = (_dummy(device, t) for t in (torch.int32, torch.int16, torch.int8, torch.uint8))
    tin = tiers_in if tiers_in is not None else i8
    rawt = raw if raw is not None else i32
    code = code if code is not None else u8
    # 16-bit tensor-core products where q, K and V share a 16-bit dtype; the interpreter's 16-bit dot is
    # not numpy's, so it multiplies in fp32
    dot_f32 = key.dtype == torch.float32 or query.dtype != key.dtype or value.dtype != key.dtype or interpreting()
    groups = heads // kheads
    grid = (nbatch * kheads * triton.cdiv(groups * tokens, BLOCK_M), nch)
    attend_kernel[grid](
        query, *query.stride(), key, *key.stride(), value, *value.stride(), qc, *qc.stride(), kc, *kc.stride(),
        tin, *(tin.stride() if tiers_in is not None else (0, 0, 0, 0)),
        dist if dist is not None else i16, off if off is not None else i16, code,
        *(code.stride() if code.dim() == 4 else (0, 0, 0, 0)),
        thr if thr is not None else i32, need if need is not None else i32, tie_base if tie_base is not None else i32,
        rawt, *(raw.stride() if raw is not None else (0, 0, 0, 0)), *mid.args(),
        m_part, l_part, acc_part, gap_part, nh_part, nm_part, logits, tiers_out if tiers_out is not None else i8,
        heads, kheads, tokens, seq, dim, nch, srows, float(scaling),
        W=words, R=mid.bits, R_P2=pow2(mid.bits, 16), BLOCK_D=block_d, BLOCK=block, BLOCK_M=BLOCK_M, CHUNK=chunk,
        GROUP=group, TIERS_GIVEN=tiers_in is not None, RAW_GIVEN=raw is not None, HAS_MID=mid.on,
        HAS_OFF=off is not None, WANT_LOGITS=want_logits, WANT_TIERS=tiers_out is not None, DOT_F32=dot_f32,
    )  # fmt: skip
    output = torch.empty(nbatch, heads, tokens, dim, dtype=query.dtype, device=device)
    top = torch.empty(rows, dtype=torch.float32, device=device)
    total = torch.empty_like(top)
    shift = torch.empty_like(top)
    merge_kernel[(rows,)](m_part, l_part, acc_part, gap_part, nh_part, output, top, total, shift, nch, dim,
                          HAS_MID=mid.on, BLOCK_D=block_d, CB=min(pow2(nch, 2), 32))  # fmt: skip
    return output, top, total, shift, logits, nh_part, nm_part


def _weights(logits, tiers, top, total, shift, shape, kheads, group, has_mid, want_probs, prior=None, decay=0.0,
             want_prior=False):  # fmt: skip
    """Normalised weights ``[B, H, T, S]`` (if ``want_probs``) and the updated prior ``[B, T, S]``."""
    nbatch, heads, tokens, seq = shape
    device = logits.device
    f32 = _dummy(device, torch.float32)
    probs = torch.empty(shape, dtype=torch.float32, device=device) if want_probs else f32
    new_prior = torch.empty(nbatch, tokens, seq, dtype=torch.float32, device=device) if want_prior else f32
    has_prior = prior is not None and tuple(prior.shape) == (nbatch, tokens, seq)
    weights_kernel[(nbatch * tokens, triton.cdiv(seq, WEIGHTS_BLOCK))](
        logits, tiers, top, total, shift, probs, prior.contiguous() if has_prior else f32, new_prior, float(decay),
        heads, kheads, tokens, seq, GROUP=group, HAS_MID=has_mid, WANT_PROBS=want_probs, WANT_PRIOR=want_prior,
        HAS_PRIOR=has_prior, BLOCK=WEIGHTS_BLOCK,
    )  # fmt: skip
    return (probs if want_probs else None), (new_prior if want_prior else None)


def tiered_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    tiers: torch.Tensor,
    scaling: float,
    mid: MidTierInputs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over high (exact) and mid (estimated) keys: ``(output [B, H, T, D], probs [B, H, T, S])``.

    Reads K rows of high keys and V rows of high and mid keys only; estimates from ``mid.dist`` and the
    codes (see :func:`dashkv.ops.reference.tiered_attention`).
    """
    check_device(query=query, key=key, value=value, tiers=tiers)
    nbatch, heads, tokens, dim = query.shape
    kheads, seq = key.shape[1], key.shape[2]
    if key.dim() != 4 or value.shape != key.shape or heads % kheads:
        raise ValueError(f"key / value must be [B, Hkv, S, D] with H % Hkv == 0, got {tuple(key.shape)}")
    if seq == 0:  # the reference's softmax over no keys: empty weights, zero output
        return torch.zeros_like(query), torch.zeros(nbatch, heads, tokens, 0, device=query.device)
    shape = (nbatch, heads, tokens, seq)
    tiers = tiers.to(torch.int8).expand(shape).contiguous()
    if mid is not None:
        check_device(dist=mid.dist, query_codes=mid.query_codes, key_codes=mid.key_codes)
        qc, kc, raw = mid.query_codes, mid.key_codes.expand(nbatch, kheads, seq, -1), mid.dist.expand(shape)
        spec = _Mid(query.device, heads, shape[:3], mid.key_norm.expand(nbatch, kheads, seq), mid.query_norm,
                    mid.query_dot_center, mid.temperature, mid.bias, mid.residual, mid.bits)  # fmt: skip
    else:
        qc = kc = raw = None
        spec = _Mid(query.device, heads, shape[:3])
    i64 = _dummy(query.device, torch.int64).view(1, 1, 1, 1)
    out = _attend(query, key, value, qc if qc is not None else i64.expand(nbatch, heads, tokens, 1),
                  kc if kc is not None else i64.expand(nbatch, kheads, seq, 1), scaling, spec, tiers_in=tiers, raw=raw,
                  want_logits=True)  # fmt: skip
    output, top, total, shift, logits = out[:5]
    probs, _ = _weights(logits, tiers, top, total, shift, shape, kheads, False, spec.on, True)
    return output, probs


def decode_step(inputs: StepInputs, settings: StepSettings, mid: MidTierWeights | None) -> StepOutputs:
    """The whole DASH-KV step of one layer (see :func:`dashkv.ops.reference.decode_step`): code scan with
    histograms, consensus and momentum, thresholds, split-K tiered attention, merge, weights and prior;
    no ``[B, H, T, S]`` tensor unless weights or a prior are asked for."""
    q, key, value = inputs.query, inputs.key, inputs.value
    check_device(query=q, key=key, value=value, query_codes=inputs.query_codes, key_codes=inputs.key_codes,
                 visible=inputs.visible, always=inputs.always)  # fmt: skip
    if settings.share == "union":
        return _union_step(inputs, settings, mid)
    check_choice("share", settings.share, SHARING)
    if settings.spatial_step > 0 or settings.temporal_step > 0:
        raise ValueError(f"discounts must be <= 0, got spatial_step={settings.spatial_step}, "
                         f"temporal_step={settings.temporal_step}")  # fmt: skip
    nbatch, heads, tokens, dim = q.shape
    kheads, seq = key.shape[1], key.shape[2]
    if key.dim() != 4 or value.shape != key.shape or heads % kheads:
        raise ValueError(f"key / value must be [B, Hkv, S, D] with H % Hkv == 0, got {tuple(key.shape)}")
    if tuple(inputs.query_codes.shape[:3]) != (nbatch, heads, tokens) or tuple(inputs.key_codes.shape[:3]) != (
        nbatch, kheads, seq
    ):
        raise ValueError("query_codes / key_codes do not match query / key shapes")
    device = q.device
    shape = (nbatch, heads, tokens, seq)
    want_probs = settings.want_weights or settings.want_prior
    if seq == 0:  # as the reference: empty weights and tiers, zero output
        empty = torch.zeros(shape, device=device)
        return StepOutputs(
            torch.zeros_like(q), torch.zeros(3, dtype=torch.int64, device=device),
            torch.zeros(nbatch, tokens, 0, device=device) if settings.want_prior else None,
            empty if settings.want_weights else None, empty.to(torch.int8) if settings.want_weights else None,
        )  # fmt: skip
    group = settings.share == "group"
    sel_heads = kheads if group else heads
    srows = nbatch * sel_heads * tokens
    hi = int(settings.bits)
    code, count, visible_total = _step_masks(inputs.visible, inputs.always, (nbatch, sel_heads, tokens, seq))
    chunk, _, nch = _chunking(seq)
    qc, kc = inputs.query_codes, inputs.key_codes
    words = qc.shape[-1]
    dist = torch.empty(srows, seq, dtype=torch.int16, device=device)
    hist = torch.empty(srows, nch, pow2(hi + 1, 2), dtype=torch.int32, device=device)
    scan_kernel[(nbatch * kheads, nch)](
        qc, *qc.stride(), kc, *kc.stride(), code, *code.stride(), dist, hist, heads, kheads, tokens, seq, nch,
        W=words, CHUNK=chunk, NBP=hist.shape[2], GROUP=group, WANT_HIST=True,
    )  # fmt: skip
    votes_on = settings.min_votes > 0 and settings.spatial_step != 0
    time_on = inputs.prior is not None and settings.temporal_step != 0
    lo = (settings.spatial_step if votes_on else 0) + (settings.temporal_step if time_on else 0)
    off = None
    high, both = float(settings.high), float(settings.high) + float(settings.mid)
    if votes_on or time_on:
        thr, need, tie_base = _thresholds(hist, 0, hi + 1, fractions=(high,))
        off = torch.empty(nbatch * tokens, seq, dtype=torch.int16, device=device)
        raw_hist, hist = hist, torch.empty(srows, nch, pow2(hi - lo + 1, 2), dtype=torch.int32, device=device)
        prior = inputs.prior.to(torch.float32).contiguous() if time_on else _dummy(device, torch.float32)
        calibrate_kernel[(nbatch * tokens, nch)](
            dist, code, *code.stride(), thr, need, tie_base, prior, count, float(settings.momentum_ratio), off, hist,
            sel_heads, tokens, seq, nch, int(settings.min_votes), int(settings.spatial_step),
            int(settings.temporal_step), lo, VOTES=votes_on, TEMPORAL=time_on, CHUNK=chunk, NBP=hist.shape[2],
        )  # fmt: skip
        del raw_hist
    thr, need, tie_base = _thresholds(hist, lo, hi - lo + 1, fractions=(high, both))
    if mid is not None and settings.mid > 0:  # |q| and q . mu (mu: the key centre of q's KV head)
        q32 = q.to(torch.float32)
        center = expand_kv(mid.key_center.to(device=device, dtype=torch.float32).unsqueeze(0), heads)[0]
        spec = _Mid(device, heads, shape[:3], inputs.key_norms.expand(nbatch, kheads, seq), q32.norm(dim=-1),
                    torch.einsum("bhtd,hd->bht", q32, center), mid.temperature, mid.bias, mid.residual,
                    settings.bits)  # fmt: skip
    else:
        spec = _Mid(device, heads, shape[:3])
    tiers = torch.empty(srows, seq, dtype=torch.int8, device=device) if want_probs else None
    output, top, total, shift, logits, nh, nm = _attend(
        q, key, value, qc, kc, settings.scaling, spec, dist=dist, off=off, code=code, thr=thr, need=need,
        tie_base=tie_base, group=group, want_logits=want_probs, tiers_out=tiers,
    )  # fmt: skip
    probs = prior = None
    if want_probs:
        probs, prior = _weights(logits, tiers, top, total, shift, shape, kheads, group, spec.on,
                                settings.want_weights, inputs.prior, settings.momentum_decay,
                                settings.want_prior)  # fmt: skip
    n_high, n_mid = nh.sum(dtype=torch.int64), nm.sum(dtype=torch.int64)
    counts = torch.stack([n_high, n_mid, visible_total * heads - n_high - n_mid])
    tiers_t = None
    if settings.want_weights:
        tiers_t = tiers.view(nbatch, sel_heads, tokens, seq)
        tiers_t = expand_kv(tiers_t, heads) if group else tiers_t
    return StepOutputs(output, counts, prior, probs, tiers_t)


def _union_step(inputs: StepInputs, settings: StepSettings, mid: MidTierWeights | None) -> StepOutputs:
    """``share="union"``: the per-head step's tiers joined over each GQA group, then the tiered attention
    over them. Two passes and a ``[B, H, T, S]`` tiers tensor: no fused kernel for the union yet."""
    per_head = decode_step(inputs, settings._replace(share="head", want_weights=True, want_prior=False), mid)
    tiers = union_tiers(per_head.tiers, inputs.key.shape[1])
    raw = hamming_distance(inputs.query_codes, inputs.key_codes)
    return attend_over_tiers(inputs, settings, mid, raw, tiers, attention=tiered_attention)


def layer_step(plan: LayerPlan, inputs: StepInputs) -> StepOutputs:
    """One layer's step from its plan (see :func:`dashkv.ops.reference.layer_step`): the codes of keys not
    coded yet and of the queries (where ``inputs.query_codes`` is None) by the plan's encoder, then
    :func:`decode_step`."""
    code_new_keys(plan.encoder, inputs, encode_key)
    if inputs.query_codes is None:
        inputs = inputs._replace(query_codes=encode_query(plan.encoder, inputs.query))
    return decode_step(inputs, plan.settings, plan.mid)

