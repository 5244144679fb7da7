"""Full attention of a few queries over a whole cache, reading each K and V row once per GQA group: the
step of a layer left to full attention (``dense_layers``).

The tier kernel would serve such a layer with every key high, gathering a chunk's rows once per query
head; at Gemma-3-270M's head dim (256) a chunk's K and V do not stay in L2 between heads, so each head
read them again from memory (4x the bytes at 32K keys). Here one pass over a chunk's keys computes the
logits of every query head and token of the KV head from each K row while it is in L1, and one pass
adds each V row to all of their sums.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from dashkv.ops.cpu import views as vw
from dashkv.ops.cpu.jit import FASTMATH, JIT, PJIT, expf, load_f32, mask_row, task_span

CHUNK = 1024
"""Keys per task: their logits for a GQA group (4 heads: 16 KiB) stay in L1 between the two passes."""


@njit(fastmath=FASTMATH, **PJIT)
def dense_kernel(q, rows, vis, dims, scaling, m_part, l_part, acc_part, probs, want_probs, chunk):
    """Split-softmax attention over every visible key: ``q [B*H*T, D]`` fp32, ``rows`` the layer's
    :class:`~dashkv.ops.cpu.views.KeyRows`, ``vis`` / ``dims`` the visibility rows and their row map
    (:func:`~dashkv.ops.cpu.jit.mask_row`). One task is a (batch, KV head, chunk); writes each
    (row, chunk)'s max, sum of exponentials and unnormalised ``sum exp * v``, and where
    ``want_probs`` the keys' unnormalised weights into ``probs``."""
    keys, vals, half = rows.keys, rows.values, rows.half
    kheads, seq, kstride = rows.kv_heads, rows.length, rows.stride
    heads, tokens = dims[0], dims[1]
    nbatch = q.shape[0] // (heads * tokens)
    dim = q.shape[1]
    kbatch = keys.shape[0] // (kheads * kstride)
    groups = heads // kheads
    width = groups * tokens  # the query rows that share a task's K and V rows
    nch = (seq + chunk - 1) // chunk
    for task in prange(nbatch * kheads * nch):
        b, kvh, c, kbase, s0, s1 = task_span(task, nch, kheads, kbatch, seq, chunk, kstride)
        n = s1 - s0
        logit = np.empty((width, n), np.float32)
        row_of = np.empty(width, np.int64)
        mrow = np.empty(width, np.int64)
        for w in range(width):  # w = g * tokens + t: the rows of query heads kvh * groups + g
            row_of[w] = (b * heads + kvh * groups) * tokens + w
            mrow[w] = mask_row(row_of[w], dims)
        i = 0
        while i + 2 <= n:  # logits, two K rows a pass, each read once for every row of the group
            k0 = np.uintp(kbase + s0 + i)
            for w in range(width):
                r = np.uintp(row_of[w])
                dot0 = dot1 = np.float32(0.0)
                for j in range(dim):
                    dot0 += q[r, j] * load_f32(keys[k0, j], half)
                    dot1 += q[r, j] * load_f32(keys[k0 + 1, j], half)
                logit[w, i] = dot0
                logit[w, i + 1] = dot1
            i += 2
        for i in range(i, n):
            k0 = np.uintp(kbase + s0 + i)
            for w in range(width):
                r = np.uintp(row_of[w])
                dot0 = np.float32(0.0)
                for j in range(dim):
                    dot0 += q[r, j] * load_f32(keys[k0, j], half)
                logit[w, i] = dot0
        for w in range(width):  # scaled, hidden keys at -inf (vectorised)
            m = np.uintp(mrow[w])
            for i in range(n):
                seen = vis[m, np.uintp(s0 + i)] != 0
                logit[w, i] = logit[w, i] * scaling if seen else np.float32(-np.inf)
        for w in range(width):
            r = np.uintp(row_of[w])
            top = np.float32(-np.inf)
            for i in range(n):
                top = max(top, logit[w, i])
            total = 0.0
            if top > -np.inf:
                sub = np.float32(0.0)
                for i in range(n):  # vectorised
                    e = expf(logit[w, i] - top)
                    logit[w, i] = e
                    sub += e
                total = np.float64(sub)
            else:
                for i in range(n):
                    logit[w, i] = 0.0
            m_part[r, c] = top
            l_part[r, c] = total
            for j in range(dim):
                acc_part[r, c, j] = 0.0
            if want_probs:
                for i in range(n):
                    probs[r, np.uintp(s0 + i)] = logit[w, i]
        i = 0
        while i + 2 <= n:  # weighted sums: each pair of V rows read once for every row of the group
            v0 = np.uintp(kbase + s0 + i)
            for w in range(width):
                e0, e1 = logit[w, i], logit[w, i + 1]
                acc = acc_part[np.uintp(row_of[w]), c]
                for j in range(dim):
                    acc[j] += e0 * load_f32(vals[v0, j], half) + e1 * load_f32(vals[v0 + 1, j], half)
            i += 2
        if i < n:
            v0 = np.uintp(kbase + s0 + i)
            for w in range(width):
                e0 = logit[w, i]
                acc = acc_part[np.uintp(row_of[w]), c]
                for j in range(dim):
                    acc[j] += e0 * load_f32(vals[v0, j], half)


@njit(**JIT)
def dense_merge(m_part, l_part, acc_part, out, factor):
    """Combine the chunk partials (in float64) into ``out``; ``factor[row, c]``: the scale of chunk
    ``c``'s unnormalised weights. A row with no visible key gets NaN, as torch's softmax of all ``-inf``."""
    rows, nch = m_part.shape
    dim = out.shape[1]
    row_sum = np.empty(dim, np.float64)
    for r in range(rows):
        top = -np.inf
        for c in range(nch):
            top = max(top, np.float64(m_part[r, c]))
        if top == -np.inf:
            for j in range(dim):
                out[r, j] = np.nan
            for c in range(nch):
                factor[r, c] = np.nan
            continue
        total = 0.0
        for j in range(dim):
            row_sum[j] = 0.0
        for c in range(nch):
            w = math.exp(np.float64(m_part[r, c]) - top) if m_part[r, c] > -np.inf else 0.0
            factor[r, c] = w
            total += w * l_part[r, c]
            for j in range(dim):
                row_sum[j] += w * np.float64(acc_part[r, c, j])
        for j in range(dim):
            out[r, j] = np.float32(row_sum[j] / total)
        for c in range(nch):
            factor[r, c] /= total


@njit(fastmath=FASTMATH, **PJIT)
def dense_scale_probs(probs, factor, chunk):
    """``probs[r, s] *= factor[r, chunk of s]``."""
    rows, seq = probs.shape
    nch = factor.shape[1]
    for task in prange(rows * nch):
        r = np.uintp(task // nch)
        c = task % nch
        f = np.float32(factor[r, c])
        for s in range(c * chunk, min(seq, (c + 1) * chunk)):
            probs[r, np.uintp(s)] *= f


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    want_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention over the visible keys: ``(output [B, H, T, D], probs [B, H, T, S] or None)``
    (see :func:`dashkv.ops.reference.dense_attention`)."""
    vw.check_cpu(query, key, value, visible)
    nbatch, heads, tokens, dim = query.shape
    seq = key.shape[2]
    if seq == 0:  # the reference's softmax over no keys: empty weights, zero output
        return torch.zeros_like(query), torch.zeros(nbatch, heads, tokens, 0) if want_probs else None
    q = vw.as_numpy(query.detach().to(torch.float32)).reshape(-1, dim)
    kv = vw.layer_rows(key, value, heads)
    vis, dims = vw.mask_array(visible, (nbatch, heads, tokens, seq), "visible")
    rows = nbatch * heads * tokens
    nch = -(-seq // CHUNK)
    m_part = np.empty((rows, nch), np.float32)
    l_part = np.empty((rows, nch), np.float64)
    acc_part = np.empty((rows, nch, dim), np.float32)
    probs = np.empty((rows, seq) if want_probs else (1, 1), np.float32)
    dense_kernel(q, kv, vis, dims, np.float32(scaling), m_part, l_part, acc_part, probs, want_probs, CHUNK)
    out = np.empty((rows, dim), np.float32)
    factor = np.empty((rows, nch), np.float64)
    dense_merge(m_part, l_part, acc_part, out, factor)
    output = torch.from_numpy(out).view(nbatch, heads, tokens, dim).to(query.dtype)
    if not want_probs:
        return output, None
    dense_scale_probs(probs, factor, CHUNK)
    return output, torch.from_numpy(probs).view(nbatch, heads, tokens, seq)
