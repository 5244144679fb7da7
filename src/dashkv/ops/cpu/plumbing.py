"""Torch <-> numpy plumbing of the CPU backend: validation, zero-copy views, mask rows, mid-tier tables
and the split-softmax partials."""

from __future__ import annotations

import functools
import math
import threading

import numpy as np
import torch
from numba import njit

from dashkv.ops.cpu.attend import merge_kernel
from dashkv.ops.cpu.jit import BF16, F16, JIT
from dashkv.ops.reference import MidTierInputs


def check_cpu(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"the cpu backend takes CPU tensors, got one on {t.device}")


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """C-contiguous numpy view (no copy when already contiguous); 16-bit floats as raw ``uint16`` bits."""
    t = t.detach().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def check_codes(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.int64:
        raise ValueError(f"codes must be packed int64 words, got dtype {t.dtype}")
    return t


def codes_array(t: torch.Tensor) -> np.ndarray:
    return as_numpy(check_codes(t))


def f32_keys(norms: torch.Tensor, key_shape: tuple[int, int, int]) -> torch.Tensor:
    """Per-key norms as float32 ``[Bk, Hkv, S]`` (a view when they already are)."""
    norms = torch.as_tensor(norms).detach()
    norms = norms if norms.dtype == torch.float32 else norms.to(torch.float32)
    return norms if tuple(norms.shape) == key_shape else norms.expand(key_shape)


def dist2d(dist: torch.Tensor) -> np.ndarray:
    if dist.dim() != 4 or dist.dtype.is_floating_point or dist.dtype == torch.bool:
        raise ValueError("dist must be an integer tensor [B, H, T, S]")
    if dist.dtype not in (torch.int32, torch.int64):
        dist = dist.to(torch.int64)
    return as_numpy(dist).reshape(math.prod(dist.shape[:3]), dist.shape[3])


def dist_dtype(top: int):
    """Distances in ``[0, top]``: one byte each while they fit (one head's codes up to 3 words)."""
    return np.uint8 if top < 255 else np.uint16


def mask_array(mask: torch.Tensor, shape: tuple[int, int, int, int], name: str) -> tuple[np.ndarray, np.ndarray]:
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
    return as_numpy(mask).reshape(math.prod(mask.shape[:3]), seq), dims


def rows_of(k: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """Per-row int64 values of ``k`` broadcast to ``[B, H, T]``."""
    k = torch.as_tensor(k).to(torch.int64)
    return k.expand(*shape[:3]).contiguous().numpy().reshape(-1)


def _head_stride(t: torch.Tensor) -> int | None:
    """Rows between two heads' first positions when ``t [Bk, Hkv, S, ...]`` is a prefix view of a
    C-contiguous ``[Bk, Hkv, capacity, ...]`` buffer (a growing cache's), else None."""
    row = math.prod(t.shape[3:])
    inner = t.stride()[3:]
    if any(st != math.prod(t.shape[4 + i :]) for i, st in enumerate(inner)) or t.stride(2) != row:
        return None
    if t.shape[1] > 1 and t.stride(1) % row:
        return None
    stride = t.stride(1) // row if t.shape[1] > 1 else t.shape[2]
    if stride < t.shape[2] or (t.shape[0] > 1 and t.stride(0) != t.shape[1] * stride * row):
        return None
    needed = t.storage_offset() + t.shape[0] * t.shape[1] * stride * row
    return stride if needed * t.element_size() <= t.untyped_storage().nbytes() else None


def key_rows(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Per-key tensors ``[Bk, Hkv, S, ...]`` (K, V, codes, norms) as flat row tensors ``[Bk * Hkv *
    stride, ...]`` sharing one head stride, and that stride: views of a growing cache's buffers (no
    copy) when all of them are views with the same stride, else contiguous copies (stride ``S``)."""
    strides = {_head_stride(t) for t in tensors}
    if len(strides) == 1 and None not in strides:
        stride = strides.pop()
        flat = [
            torch.as_strided(t, (t.shape[0] * t.shape[1] * stride, *t.shape[3:]), (math.prod(t.shape[3:]), *t.stride()[3:]))
            for t in tensors
        ]
        return flat, stride
    seq = tensors[0].shape[2]
    return [t.contiguous().reshape(t.shape[0] * t.shape[1] * seq, *t.shape[3:]) for t in tensors], seq


def kv_arrays(key: torch.Tensor, value: torch.Tensor, heads: int, *others: torch.Tensor):
    """K and V (and ``others``: per-key codes or norms) as ``[Bk * Hkv * stride, ...]`` row arrays of one
    head stride, their 16-bit format (0: a float dtype as is) and the stride (see :func:`key_rows`)."""
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 4 or heads % t.shape[1]:
            raise ValueError(f"{name} must be [B, Hkv, S, D] with H % Hkv == 0, got {tuple(t.shape)}")
    if key.dtype != value.dtype or not key.dtype.is_floating_point:
        key, value = key.to(torch.float32), value.to(torch.float32)
    half = {torch.bfloat16: BF16, torch.float16: F16}.get(key.dtype, 0)
    rows, stride = key_rows(key.detach(), value.detach(), *(t.detach() for t in others))
    return (*[as_numpy(t) for t in rows], half, stride)


@njit(**JIT)
def byte_tables(phi):
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
def cos_table(bits: int) -> np.ndarray:
    """``cos(pi * d / R)`` for ``d = 0..R``, computed as the reference does (fp32 torch)."""
    return torch.cos(math.pi * torch.arange(bits + 1, dtype=torch.float32) / bits).numpy()


_TABLES: dict[tuple, tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}
_TABLES_LIMIT = 256  # entries: a few models' layers


def residual_tables(residual: torch.Tensor, heads: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte tables (:func:`byte_tables`) and ``sum phi`` per head of the residual bit weights, kept
    between calls: the weights change only in training, and rebuilding the tables cost ~25 us of a
    ~300 us fused call at 2K keys (a check costs ~5). A hit needs equal contents (``torch.equal``
    with a private copy), so weights changed in place, or freed and their memory reused, are never
    served stale tables."""
    weights = residual.detach().to(torch.float32).reshape(heads, -1)[:, :bits]
    key = (weights.data_ptr(), heads, bits)
    hit = _TABLES.get(key)
    if hit is not None and torch.equal(hit[0], weights):
        return hit[1], hit[2]
    if len(_TABLES) >= _TABLES_LIMIT:
        _TABLES.clear()
    copy = weights.clone()
    tab = byte_tables(np.ascontiguousarray(copy.numpy()))
    sumphi = copy.sum(-1).numpy()
    _TABLES[key] = (copy, tab, sumphi)
    return tab, sumphi


def _f32(t, shape: tuple[int, ...]) -> np.ndarray:
    """``t`` broadcast to ``shape`` as a flat float32 array (a view when it already is one)."""
    t = torch.as_tensor(t).detach()
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    if tuple(t.shape) != shape:
        t = t.expand(shape)
    return as_numpy(t).reshape(-1)


_EMPTY = np.zeros(0, np.float32)


def mid_arrays(mid: MidTierInputs | None, query_shape: tuple[int, ...], knorm: np.ndarray | None, words: int):
    """Per-head tables and flat views of the mid-tier inputs (dummies when ``mid`` is None).

    ``query_shape`` is ``(B, H, T)``: the query norms are broadcast to it, so that they are indexed
    like the query rows; ``knorm`` are the key norms as K's row array (:func:`kv_arrays`).
    """
    if mid is None:
        f1 = np.zeros(1, np.float32)
        return (False, f1, f1, f1, f1, f1, np.zeros((1, 16, 256), np.float32), f1, f1, 1)
    heads = query_shape[1]
    bits = int(mid.bits)
    if bits < 1 or bits > 64 * words or words > 2:
        raise ValueError(f"mid tier needs 1..{64 * words} bits in at most 2 words, got bits={bits}")
    tab, sumphi = residual_tables(mid.residual, heads, bits)
    unset = mid.query_norm is None  # the compiled step computes |q| and q . mu
    return (
        True,
        _EMPTY if unset else _f32(mid.query_norm, query_shape),
        knorm,
        _EMPTY if unset else _f32(mid.query_dot_center, query_shape),
        _f32(mid.temperature, (heads,)),
        _f32(mid.bias, (heads,)),
        tab,
        sumphi,
        cos_table(bits),
        bits,
    )


def new_parts(rows: int, seq: int, dim: int, chunk: int):
    """Per (row, chunk) partials: max and sum exp and sum exp * v of high ``[..., 0]`` and mid
    ``[..., 1]`` keys, the anchor numerator and the number of high keys. Uninitialised: the attention
    kernels write every (row, chunk) entry."""
    nch = max(1, -(-seq // chunk))
    m_part = np.empty((rows, nch, 2), np.float32)
    l_part = np.empty((rows, nch, 2), np.float64)
    acc_part = np.empty((rows, nch, 2, dim), np.float32)
    gap_part = np.empty((rows, nch), np.float64)
    nhigh_part = np.empty((rows, nch), np.int64)
    return m_part, l_part, acc_part, gap_part, nhigh_part


def merge_parts(parts, mid_on, shape, dtype):
    """Merge the partials into ``[B, H, T, D]`` in ``dtype``; also returns each partial's normalised
    weight ``factor [rows, chunks, 2]`` (the scale of the chunk's unnormalised high / mid weights)."""
    nbatch, heads, tokens, dim = shape
    m_part = parts[0]
    out = np.empty((nbatch * heads * tokens, dim), np.float32)
    factor = np.empty(m_part.shape, np.float64)
    merge_kernel(*parts, mid_on, out, factor)
    output = torch.from_numpy(out).view(nbatch, heads, tokens, dim)
    return (output if dtype == torch.float32 else output.to(dtype)), factor


def visible_count(code: np.ndarray, cdims: np.ndarray, rows_shape: tuple[int, int, int]) -> int:
    """Visible (query head, token, key) triples of a ``[B, H, T]`` block, from the mask rows of
    :func:`mask_array`."""
    per_row = np.count_nonzero(code, axis=1).reshape(int(cdims[2]), int(cdims[3]), int(cdims[4]))
    return int(np.broadcast_to(per_row, rows_shape).sum())


def codes_of(visible: torch.Tensor, always: torch.Tensor | None) -> torch.Tensor:
    """One byte per key: 0 hidden, 1 eligible, 2 always high (visible sinks and window)."""
    visible = visible.to(torch.bool)
    if always is None:
        return visible.to(torch.uint8)
    return visible.to(torch.uint8) + (visible & always.to(torch.bool))



_SCRATCH = threading.local()
_SCRATCH_LIMIT = 32 * 2**20  # bytes a kept buffer may have


def scratch(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A reusable uninitialised buffer (per thread and name): large per-call intermediates of the fused
    step skip the allocation and the page faults of fresh memory. The caller overwrites it whole."""
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    size = math.prod(shape)
    if size * np.dtype(dtype).itemsize > _SCRATCH_LIMIT:  # large query blocks: not worth keeping
        return np.empty(shape, dtype)
    buf = pool.get((name, np.dtype(dtype)))
    if buf is None or buf.size < size:
        buf = np.empty(max(size, 1), dtype)
        pool[(name, np.dtype(dtype))] = buf
    return buf[:size].reshape(shape)
