"""Split-K (flash-decoding) tiered attention: per (row, chunk) softmax partials, a merge, the weights.

A program is one (batch, KV head, block of the group's (query head, token) rows, chunk of keys). It
walks its chunk from the last sub-block to the first (ties at a threshold go to the latest keys),
decides every key's tier from the calibrated distance and the row's thresholds (or reads given tiers),
and loads K rows only where some row of the block has a high key and V rows only where one has a
high or mid key: masked-out rows of a tile cost no memory traffic, so the kernel reads what a gather
would, with dense tiles for the arithmetic. High and mid keep separate partials because the mid logits
move by the row's anchor offset (mean ``exact - estimate`` over its high keys), known only after all
chunks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dashkv.ops.triton.common import popcount64, selected


@triton.jit
def _online(m, l, acc, logits, take, v, DOT_F32: tl.constexpr):
    """One sub-block of an online softmax over the keys where ``take``: new ``(max, sum exp, sum exp v)``."""
    blk = tl.max(tl.where(take, logits, float("-inf")), 1)
    m_new = tl.maximum(m, blk)
    alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
    p = tl.where(take, tl.exp(logits - m_new[:, None]), 0.0)
    if DOT_F32:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + pv


@triton.jit
def attend_kernel(
    q_ptr, qsb, qsh, qst, qsd,
    k_ptr, ksb, ksh, kss, ksd,
    v_ptr, vsb, vsh, vss, vsd,
    qc_ptr, qcsb, qcsh, qcst, qcsw,
    kc_ptr, kcsb, kcsh, kcss, kcsw,
    tin_ptr, tisb, tish, tist, tiss,
    dist_ptr, off_ptr, code_ptr, csb, csh, cst, css, thr_ptr, need_ptr, tb_ptr,
    raw_ptr, rsb, rsh, rst, rss,
    qn_ptr, qdc_ptr, kn_ptr, knsb, knsh, knss, temp_ptr, bias_ptr, phi_ptr, cos_ptr,
    m_ptr, l_ptr, acc_ptr, gap_ptr, nh_ptr, nm_ptr, logit_ptr, tout_ptr,
    H, HKV, T, S, D, NCH, SROWS, scaling,
    W: tl.constexpr, R: tl.constexpr, R_P2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr, TIERS_GIVEN: tl.constexpr,
    RAW_GIVEN: tl.constexpr, HAS_MID: tl.constexpr, HAS_OFF: tl.constexpr, WANT_LOGITS: tl.constexpr,
    WANT_TIERS: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """Partials of one (batch, KV head, row block, chunk); see the module docstring.

    Rows ``m`` of the block are (g, t) pairs of KV head ``kvh`` (query head ``kvh * G + g``); their
    query row is ``(b * H + h) * T + t`` and their selection row the same, or ``(b * HKV + kvh) * T +
    t`` with ``GROUP``. Tiers come from ``tin`` (``TIERS_GIVEN``) or from ``dist [SROWS, S] + off [B*T,
    S]``, mask codes and the threshold sets 0 (high) and 1 (high + mid) of ``thr/need/tb``. The mid
    estimate reads raw distances from ``raw`` (``RAW_GIVEN``) or from the codes. Writes ``m, l [rows,
    NCH, 2]``, ``acc [rows, NCH, 2, BLOCK_D]``, the anchor numerator ``gap`` and the high / mid counts
    ``nh, nm [rows, NCH]``; optionally the logits (exact or unshifted estimate) and the tiers.
    Grid: ``(B * HKV * cdiv(G * T, BLOCK_M), NCH)``.
    """
    pid = tl.program_id(0)
    c = tl.program_id(1)
    G = H // HKV
    n_mt = tl.cdiv(G * T, BLOCK_M)
    mt = pid % n_mt
    kvh = (pid // n_mt) % HKV
    b = (pid // (n_mt * HKV)).to(tl.int64)
    m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    mvalid = m < G * T
    g = m // T
    t = m % T
    h = kvh * G + g
    qrow = (b * H + h) * T + t
    srow = (b * HKV + kvh) * T + t if GROUP else qrow
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < D
    q = tl.load(q_ptr + b * qsb + h[:, None] * qsh + t[:, None] * qst + dims[None, :] * qsd,
                mask=mvalid[:, None] & dmask[None, :], other=0.0)  # fmt: skip
    if DOT_F32:
        q = q.to(tl.float32)
    if not TIERS_GIVEN:
        th_h = tl.load(thr_ptr + srow, mask=mvalid, other=0)
        nd_h = tl.load(need_ptr + srow, mask=mvalid, other=0)
        th_m = tl.load(thr_ptr + SROWS + srow, mask=mvalid, other=0)
        nd_m = tl.load(need_ptr + SROWS + srow, mask=mvalid, other=0)
        carry_h = tl.load(tb_ptr + srow * NCH + c, mask=mvalid, other=0)
        carry_m = tl.load(tb_ptr + (SROWS + srow) * NCH + c, mask=mvalid, other=0)
    if HAS_MID:
        bits = tl.arange(0, R_P2)
        word = tl.load(qc_ptr + b * qcsb + h[:, None] * qcsh + t[:, None] * qcst + (bits[None, :] // 64) * qcsw,
                       mask=mvalid[:, None] & (bits[None, :] < R), other=0)  # fmt: skip
        qbit = (word >> (bits[None, :] % 64).to(tl.int64)) & 1
        phi = tl.load(phi_ptr + h[:, None] * R + bits[None, :], mask=mvalid[:, None] & (bits[None, :] < R), other=0.0)
        wq = tl.where(qbit != 0, phi, -phi)  # q's signs times the bit weights
        qn = tl.load(qn_ptr + qrow, mask=mvalid, other=0.0)
        qdc = tl.load(qdc_ptr + qrow, mask=mvalid, other=0.0)
        a_row = tl.load(temp_ptr + h, mask=mvalid, other=0.0) * qn
        bias = tl.load(bias_ptr + h, mask=mvalid, other=0.0)
    m_h = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_h = tl.zeros([BLOCK_M], tl.float32)
    acc_h = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_m = tl.zeros([BLOCK_M], tl.float32)
    acc_m = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    gap = tl.zeros([BLOCK_M], tl.float32)
    nh = tl.zeros([BLOCK_M], tl.int32)
    nm = tl.zeros([BLOCK_M], tl.int32)
    keys = tl.arange(0, BLOCK)
    n_sub = CHUNK // BLOCK
    for j in range(n_sub):
        offs = c * CHUNK + (n_sub - 1 - j) * BLOCK + keys  # latest sub-block first
        inb = offs < S
        valid = mvalid[:, None] & inb[None, :]
        if TIERS_GIVEN:
            tier = tl.load(tin_ptr + b * tisb + h[:, None] * tish + t[:, None] * tist + offs[None, :] * tiss,
                           mask=valid, other=-1).to(tl.int32)  # fmt: skip
        else:
            d = tl.load(dist_ptr + srow[:, None] * S + offs[None, :], mask=valid, other=0).to(tl.int32)
            if HAS_OFF:
                d += tl.load(off_ptr + (b * T + t[:, None]) * S + offs[None, :], mask=valid, other=0).to(tl.int32)
            code = tl.load(code_ptr + b * csb + h[:, None] * csh + t[:, None] * cst + offs[None, :] * css,
                           mask=valid, other=0)  # fmt: skip
            elig = code == 1
            tie_h = elig & (d == th_h[:, None])
            tie_m = elig & (d == th_m[:, None])
            rank_h = carry_h[:, None] + tl.cumsum(tie_h.to(tl.int32), 1, reverse=True)
            rank_m = carry_m[:, None] + tl.cumsum(tie_m.to(tl.int32), 1, reverse=True)
            carry_h += tl.sum(tie_h.to(tl.int32), 1)
            carry_m += tl.sum(tie_m.to(tl.int32), 1)
            high = (code == 2) | selected(d, elig, th_h[:, None], nd_h[:, None], rank_h)
            both = selected(d, elig, th_m[:, None], nd_m[:, None], rank_m)
            tier = tl.where(code == 0, -1, tl.where(high, 2, tl.where(both, 1, 0)))
            if WANT_TIERS:
                keep = valid
                if GROUP:  # a group's rows share one selection: its first head writes it
                    keep = valid & (g == 0)[:, None]
                tl.store(tout_ptr + srow[:, None] * S + offs[None, :], tier.to(tl.int8), mask=keep)
        is_h = tier == 2
        is_m = tier == 1
        nh += tl.sum(is_h.to(tl.int32), 1)
        nm += tl.sum(is_m.to(tl.int32), 1)
        use_k = tl.max(is_h.to(tl.int32), 0) > 0
        use_v = use_k
        if HAS_MID:
            use_v = tl.max((is_h | is_m).to(tl.int32), 0) > 0
        kv_off = b * ksb + kvh * ksh + offs[:, None].to(tl.int64) * kss + dims[None, :] * ksd
        kt = tl.load(k_ptr + kv_off, mask=use_k[:, None] & dmask[None, :], other=0.0)
        if DOT_F32:
            exact = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee") * scaling
        else:
            exact = tl.dot(q, tl.trans(kt)).to(tl.float32) * scaling
        logits = tl.where(is_h, exact, float("-inf"))
        if HAS_MID:
            use_c = use_v  # codes and norms of the high (anchor) and mid keys
            kc_off = b * kcsb + kvh * kcsh + offs.to(tl.int64) * kcss
            if RAW_GIVEN:
                raw = tl.load(raw_ptr + b * rsb + h[:, None] * rsh + t[:, None] * rst + offs[None, :] * rss,
                              mask=valid, other=0).to(tl.int32)  # fmt: skip
            else:
                raw = tl.zeros([BLOCK_M, BLOCK], tl.int32)
                for w in tl.static_range(W):
                    qw = tl.load(qc_ptr + b * qcsb + h * qcsh + t * qcst + w * qcsw, mask=mvalid, other=0)
                    kw = tl.load(kc_ptr + kc_off + w * kcsw, mask=use_c, other=0)
                    raw += popcount64(qw[:, None] ^ kw[None, :])
            cos = tl.load(cos_ptr + tl.minimum(tl.maximum(raw, 0), R))
            kn = tl.load(kn_ptr + b * knsb + kvh * knsh + offs * knss, mask=use_c, other=0.0)
            est = (qdc[:, None] + a_row[:, None] * kn[None, :] * cos) * scaling + bias[:, None]
            kword = tl.load(kc_ptr + kc_off[:, None] + (bits[None, :] // 64) * kcsw,
                            mask=use_c[:, None] & (bits[None, :] < R), other=0)  # fmt: skip
            ksign = tl.where(((kword >> (bits[None, :] % 64).to(tl.int64)) & 1) != 0, 1.0, -1.0)
            est += tl.dot(wq, tl.trans(ksign), input_precision="ieee")  # the residual sum_r phi_r h_q h_k
            gap += tl.sum(tl.where(is_h, exact - est, 0.0), 1)
            logits = tl.where(is_m, est, logits)
        if WANT_LOGITS:
            tl.store(logit_ptr + qrow[:, None] * S + offs[None, :], logits, mask=valid)
        vt = tl.load(v_ptr + b * vsb + kvh * vsh + offs[:, None].to(tl.int64) * vss + dims[None, :] * vsd,
                     mask=use_v[:, None] & dmask[None, :], other=0.0)  # fmt: skip
        m_h, l_h, acc_h = _online(m_h, l_h, acc_h, logits, is_h, vt, DOT_F32)
        if HAS_MID:
            m_m, l_m, acc_m = _online(m_m, l_m, acc_m, logits, is_m, vt, DOT_F32)
    part = qrow * NCH + c
    tl.store(m_ptr + part * 2, m_h, mask=mvalid)
    tl.store(m_ptr + part * 2 + 1, m_m, mask=mvalid)
    tl.store(l_ptr + part * 2, l_h, mask=mvalid)
    tl.store(l_ptr + part * 2 + 1, l_m, mask=mvalid)
    acc_off = (part * 2)[:, None] * BLOCK_D + dims[None, :]
    tl.store(acc_ptr + acc_off, acc_h, mask=mvalid[:, None])
    tl.store(acc_ptr + acc_off + BLOCK_D, acc_m, mask=mvalid[:, None])
    tl.store(gap_ptr + part, gap, mask=mvalid)
    tl.store(nh_ptr + part, nh, mask=mvalid)
    tl.store(nm_ptr + part, nm, mask=mvalid)


@triton.jit
def merge_kernel(
    m_ptr, l_ptr, acc_ptr, gap_ptr, nh_ptr, out_ptr, top_ptr, sum_ptr, shift_ptr, NCH, D,
    HAS_MID: tl.constexpr, BLOCK_D: tl.constexpr, CB: tl.constexpr,
):  # fmt: skip
    """Combine a row's chunk partials into ``out [rows, D]`` (its dtype): the mid partials move by the
    anchor offset ``shift = sum gap / max(#high, 1)``. Also writes the row's softmax max ``top`` and
    sum, for the weights. Nothing selected: NaN, as torch's softmax of all ``-inf``. Grid: ``(rows,)``."""
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, CB)
    dims = tl.arange(0, BLOCK_D)
    shift = 0.0
    if HAS_MID:
        gap = tl.zeros([CB], tl.float32)
        count = tl.zeros([CB], tl.int32)
        for c0 in range(0, NCH, CB):
            cs = c0 + chunks
            gap += tl.load(gap_ptr + row * NCH + cs, mask=cs < NCH, other=0.0)
            count += tl.load(nh_ptr + row * NCH + cs, mask=cs < NCH, other=0)
        shift = tl.sum(gap, 0) / tl.maximum(tl.sum(count, 0), 1).to(tl.float32)
    top = tl.full([CB], float("-inf"), tl.float32)
    for c0 in range(0, NCH, CB):
        cs = c0 + chunks
        part = (row * NCH + cs) * 2
        top = tl.maximum(top, tl.load(m_ptr + part, mask=cs < NCH, other=float("-inf")))
        top = tl.maximum(top, tl.load(m_ptr + part + 1, mask=cs < NCH, other=float("-inf")) + shift)
    best = tl.max(top, 0)
    total = tl.zeros([CB], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, NCH, CB):
        cs = c0 + chunks
        part = (row * NCH + cs) * 2
        w_h = tl.exp(tl.load(m_ptr + part, mask=cs < NCH, other=float("-inf")) - best)
        w_m = tl.exp(tl.load(m_ptr + part + 1, mask=cs < NCH, other=float("-inf")) + shift - best)
        total += w_h * tl.load(l_ptr + part, mask=cs < NCH, other=0.0)
        total += w_m * tl.load(l_ptr + part + 1, mask=cs < NCH, other=0.0)
        a_h = tl.load(acc_ptr + part[:, None] * BLOCK_D + dims[None, :], mask=(cs < NCH)[:, None], other=0.0)
        a_m = tl.load(acc_ptr + (part + 1)[:, None] * BLOCK_D + dims[None, :], mask=(cs < NCH)[:, None], other=0.0)
        acc += tl.sum(tl.where(w_h[:, None] > 0, a_h * w_h[:, None], 0.0), 0)
        acc += tl.sum(tl.where(w_m[:, None] > 0, a_m * w_m[:, None], 0.0), 0)
    norm = tl.where(best == float("-inf"), float("nan"), tl.sum(total, 0))
    tl.store(out_ptr + row * D + dims, (acc / norm).to(out_ptr.dtype.element_ty), mask=dims < D)
    tl.store(top_ptr + row, best)
    tl.store(sum_ptr + row, norm)
    tl.store(shift_ptr + row, shift)


@triton.jit
def weights_kernel(
    logit_ptr, tier_ptr, top_ptr, sum_ptr, shift_ptr, probs_ptr, prior_ptr, new_prior_ptr, decay,
    H, HKV, T, S,
    GROUP: tl.constexpr, HAS_MID: tl.constexpr, WANT_PROBS: tl.constexpr, WANT_PRIOR: tl.constexpr,
    HAS_PRIOR: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The normalised weights ``probs [B*H*T, S]`` from the stored logits, tiers and each row's max,
    sum and anchor shift, and the next layer's prior ``decay * prior + (1 - decay) * mean_h(weights)``
    (:func:`dashkv.calibration.update_prior`). Grid: ``(B * T, cdiv(S, BLOCK))``."""
    bt = tl.program_id(0).to(tl.int64)
    b = bt // T
    t = bt % T
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < S
    G = H // HKV
    mean = tl.zeros([BLOCK], tl.float32)
    for h in range(H):
        row = (b * H + h) * T + t
        srow = (b * HKV + h // G) * T + t if GROUP else row
        logit = tl.load(logit_ptr + row * S + offs, mask=inb, other=0.0)
        tier = tl.load(tier_ptr + srow * S + offs, mask=inb, other=-1)
        top = tl.load(top_ptr + row)
        norm = tl.load(sum_ptr + row)
        shift = tl.load(shift_ptr + row)
        p = tl.where(tier == 2, tl.exp(logit - top), 0.0)
        if HAS_MID:
            p = tl.where(tier == 1, tl.exp(logit + shift - top), p)
        p = p / norm
        if WANT_PROBS:
            tl.store(probs_ptr + row * S + offs, p, mask=inb)
        mean += p
    if WANT_PRIOR:
        mean = mean / H
        if HAS_PRIOR:
            mean = decay * tl.load(prior_ptr + bt * S + offs, mask=inb, other=0.0) + (1.0 - decay) * mean
        tl.store(new_prior_ptr + bt * S + offs, mean, mask=inb)
