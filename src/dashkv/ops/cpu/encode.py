"""Hash codes of a few new queries or keys in one compiled call (the decode step's case).

:meth:`dashkv.encoders.LayerHashEncoder.encode_query` / ``encode_key`` are the reference: a dozen
torch calls (three linear layers, two GELUs, an einsum, the sign, the packing shifts), each with a
fixed cost that dwarfs the arithmetic when one token's 9 query heads or 3 keys go through them.
These kernels do the same arithmetic in float32 for a handful of rows; above :data:`MAX_ROWS` rows
torch's matrix products are faster and the reference runs. Float summation order differs from torch,
so a bit whose projection lies within rounding of 0 may differ (tested: only such bits).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from numba import njit

from dashkv.ops.cpu.jit import FASTMATH, JIT, expf, load_f32

MAX_ROWS = 64
"""Rows (batch x heads x tokens) up to which the compiled encoders run."""

_SQRT1_2 = np.float32(1.0 / math.sqrt(2.0))


@njit(fastmath=FASTMATH, inline="always", **JIT)
def _one_plus_erf(x):
    """``1 + erf(x)`` in float32 without a libm call, so that the GELU pass vectorises (libm's ``erf``
    was most of the query encoder's time). ``erfc`` by Numerical Recipes' Chebyshev fit (fractional
    error below 1.2e-7, i.e. about one float32 rounding of the GELU's ``1 + erf``)."""
    z = abs(x)
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.5) * z)
    p = np.float32(0.17087277)
    for c in _ERFC_POLY:
        p = p * t + c
    erfc = t * expf(min(-z * z + p, np.float32(0.0)))
    return np.float32(2.0) - erfc if x >= 0 else erfc


_ERFC_POLY = (
    np.float32(-0.82215223), np.float32(1.48851587), np.float32(-1.13520398), np.float32(0.27886807),
    np.float32(-0.18628806), np.float32(0.09678418), np.float32(0.37409196), np.float32(1.00002368),
    np.float32(-1.26551223),
)  # fmt: skip


@njit(fastmath=FASTMATH, **JIT)
def _dense(x, weight, bias, out, gelu):
    """``out[n] = act(weight @ x[n] + bias)`` for every row ``n``; each weight row is loaded once for
    all rows. The GELU runs as a pass of its own, after the products."""
    rows, width = x.shape
    for i in range(weight.shape[0]):
        ui = np.uintp(i)
        for n in range(rows):
            un = np.uintp(n)
            acc = np.float32(0.0)
            for j in range(width):  # unsigned indices: no wraparound check, so the loop vectorises
                uj = np.uintp(j)
                acc += weight[ui, uj] * x[un, uj]
            out[un, ui] = acc + bias[ui]
    if gelu:
        for n in range(rows):
            for i in range(weight.shape[0]):
                v = out[n, i]
                out[n, i] = np.float32(0.5) * v * _one_plus_erf(v * _SQRT1_2)


@njit(**JIT)
def _pack_row(proj, out, n):
    """Sign bits (``>= 0``) of ``proj [R]`` packed least significant bit first into ``out[n, :W]``."""
    bits = proj.shape[0]
    for w in range(out.shape[1]):
        word = np.uint64(0)
        for b in range(64):
            r = 64 * w + b
            if r < bits and proj[r] >= 0:
                word |= np.uint64(1) << np.uint64(b)
        out[n, w] = np.int64(word)


@njit(**JIT)
def _pack(proj, out):
    """Sign bits of every row of ``proj [N, R]`` packed into ``out [N, W]`` (:func:`_pack_row`)."""
    for n in range(proj.shape[0]):
        _pack_row(proj[n], out, n)


@njit(fastmath=FASTMATH, **JIT)
def query_codes_kernel(q, heads, tokens, w1, b1, w2, b2, w3, b3, skip, out):
    """Packed query codes of ``q [N, D]`` (rows ``(b, h, t)``): ``skip[h] q + MLP(q)``, signed and packed."""
    rows, dim = q.shape
    h1 = np.empty((rows, w1.shape[0]), np.float32)
    h2 = np.empty((rows, w2.shape[0]), np.float32)
    proj = np.empty((rows, w3.shape[0]), np.float32)
    _dense(q, w1, b1, h1, True)
    _dense(h1, w2, b2, h2, True)
    _dense(h2, w3, b3, proj, False)
    for n in range(rows):
        h = np.uintp((n // tokens) % heads)
        un = np.uintp(n)
        for r in range(proj.shape[1]):
            ur = np.uintp(r)
            acc = np.float32(0.0)
            for j in range(dim):
                uj = np.uintp(j)
                acc += skip[h, ur, uj] * q[un, uj]
            proj[un, ur] = acc + proj[un, ur]
    _pack(proj, out)


@njit(fastmath=FASTMATH, **JIT)
def code_key_row(keys, n, half, kvh, center, proj_w, codes, norms, centred, proj):
    """Packed code ``sign(W_k (k - mu))`` and centred norm ``|k - mu|`` of key row ``keys[n]`` (of KV
    head ``kvh``; raw 16-bit floats where ``half``) into ``codes[n]`` and ``norms[n]``; ``centred [D]``
    and ``proj [R]`` are scratch."""
    dim = keys.shape[1]
    un = np.uintp(n)
    sq = np.float32(0.0)
    for j in range(dim):
        c = load_f32(keys[un, np.uintp(j)], half) - center[kvh, j]
        centred[j] = c
        sq += c * c
    norms[un] = np.sqrt(sq)
    for r in range(proj_w.shape[1]):
        acc = np.float32(0.0)
        for j in range(dim):
            acc += proj_w[kvh, r, j] * centred[j]
        proj[r] = acc
    _pack_row(proj, codes, un)


@njit(fastmath=FASTMATH, **JIT)
def key_codes_kernel(k, kheads, tokens, center, proj_w, out, norms):
    """Packed codes ``sign(W_k (k - mu))`` and centred norms ``|k - mu|`` of ``k [N, D]`` float32 (rows
    ``(b, kvh, t)``)."""
    centred = np.empty(k.shape[1], np.float32)
    proj = np.empty(proj_w.shape[1], np.float32)
    for n in range(k.shape[0]):
        code_key_row(k, n, 0, (n // tokens) % kheads, center, proj_w, out, norms, centred, proj)


class QueryEncoder(NamedTuple):
    """A layer's query encoder as float32 arrays (:class:`dashkv.encoders.LayerHashEncoder`: the MLP's
    three linear layers and the per-head skip ``[H, R, D]``); ``on`` False: not a compiled encoder's."""

    on: bool
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    b3: np.ndarray
    skip: np.ndarray


_F1 = np.zeros(1, np.float32)
NO_ENCODER = QueryEncoder(False, *(np.zeros((1, 1), np.float32), _F1) * 3, np.zeros((1, 1, 1), np.float32))


def compiled_encoder(encoder) -> bool:
    """Whether the compiled query encoder implements ``encoder``'s: the 3-layer MLP with exact GELUs of
    :class:`dashkv.encoders.LayerHashEncoder`."""
    mlp = getattr(encoder, "query_mlp", None)
    return (
        mlp is not None and len(mlp) == 5
        and all(isinstance(m, torch.nn.GELU) and m.approximate == "none" for m in (mlp[1], mlp[3]))
    )  # fmt: skip


def few_rows(t: torch.Tensor) -> bool:
    """A few CPU rows ``[B, heads, T, ...]`` outside autograd: the compiled encoders' case."""
    return t.device.type == "cpu" and t.shape[0] * t.shape[1] * t.shape[2] <= MAX_ROWS and not torch.is_grad_enabled()


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).numpy())


def _kept(encoder, name: str, tensors: list[torch.Tensor], make):
    """``make()``, kept on ``encoder`` until one of ``tensors`` changes (storage or version counter:
    training steps bump it)."""
    stamp = tuple((t.data_ptr(), t._version) for t in tensors)
    held = encoder.__dict__.get(name)
    if held is None or held[0] != stamp:
        held = (stamp, make())
        encoder.__dict__[name] = held
    return held[1]


def query_encoder(encoder) -> QueryEncoder:
    """The query encoder's weights as float32 arrays, or :data:`NO_ENCODER` where they cannot run here."""
    if encoder is None or not compiled_encoder(encoder):
        return NO_ENCODER
    lin = [m for m in encoder.query_mlp if isinstance(m, torch.nn.Linear)]
    params = [t for m in lin for t in (m.weight, m.bias)] + [encoder.query_skip]
    return _kept(encoder, "_cpu_query_encoder", params, lambda: QueryEncoder(True, *map(_f32, params)))


class KeyEncoder(NamedTuple):
    """A layer's key encoder as float32 arrays: centres ``[Hkv, D]`` and projections ``[Hkv, R, D]``."""

    center: np.ndarray
    proj: np.ndarray


def key_encoder(encoder) -> KeyEncoder:
    """The key encoder's weights as float32 arrays."""
    params = [encoder.key_center, encoder.key_proj]
    return _kept(encoder, "_cpu_key_encoder", params, lambda: KeyEncoder(*map(_f32, params)))


def _rows(t: torch.Tensor, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``t [B, heads, T, D]`` as float32 rows ``[B * heads * T, D]`` and an empty code array for them."""
    rows = np.ascontiguousarray(t.detach().to(torch.float32).numpy().reshape(-1, t.shape[-1]))
    return rows, np.empty((rows.shape[0], -(-bits // 64)), np.int64)


def encode_query(encoder, query: torch.Tensor) -> torch.Tensor:
    """Packed query codes ``[B, H, T, W]`` int64 (as ``encoder.encode_query``)."""
    weights = query_encoder(encoder) if few_rows(query) else NO_ENCODER
    if not weights.on:
        return encoder.encode_query(query)
    nbatch, heads, tokens, _ = query.shape
    q, out = _rows(query, encoder.bits)
    query_codes_kernel(q, heads, tokens, *weights[1:], out)
    return torch.from_numpy(out).view(nbatch, heads, tokens, -1)


def encode_key(encoder, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed key codes ``[B, Hkv, T, W]`` int64 and centred norms ``[B, Hkv, T]`` (as ``encoder.encode_key``)."""
    if not few_rows(key):
        return encoder.encode_key(key)
    nbatch, kheads, tokens, _ = key.shape
    center, proj = key_encoder(encoder)
    k, out = _rows(key, proj.shape[1])
    norms = np.empty(k.shape[0], np.float32)
    key_codes_kernel(k, kheads, tokens, center, proj, out, norms)
    return torch.from_numpy(out).view(nbatch, kheads, tokens, -1), torch.from_numpy(norms).view(nbatch, kheads, tokens)
