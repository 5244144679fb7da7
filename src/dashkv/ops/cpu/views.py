"""Torch tensors as the numpy arrays the kernels read: checks, zero-copy views, the cache's key rows and
the masks' visibility rows.

Two words the kernels keep apart: *hash codes* (packed int64 words of a query's or key's bits) and
*visibility bytes* (one ``uint8`` per key and mask row: 0 hidden, 1 eligible, 2 always high).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from dashkv.ops.cpu.jit import BF16, F16

HIDDEN_KEY, ELIGIBLE_KEY, ALWAYS_KEY = 0, 1, 2
"""Visibility bytes: not visible (future or padding), visible and ranked by distance, visible and
always high (sinks and the local window)."""


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


def half_format(dtype: torch.dtype) -> int:
    """The kernels' code of a K/V dtype: 0 read as it is, :data:`BF16` / :data:`F16` raw 16-bit floats."""
    return {torch.bfloat16: BF16, torch.float16: F16}.get(dtype, 0)


def check_codes(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.int64:
        raise ValueError(f"codes must be packed int64 words, got dtype {t.dtype}")
    return t


def codes_array(t: torch.Tensor) -> np.ndarray:
    """Hash codes ``[..., W]`` int64 as a numpy array."""
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


def rows_of(k: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """Per-row int64 values of ``k`` broadcast to ``[B, H, T]``."""
    k = torch.as_tensor(k).to(torch.int64)
    return k.expand(*shape[:3]).contiguous().numpy().reshape(-1)


# ---------------------------------------------------------------------------------- key rows


class KeyRows(NamedTuple):
    """A layer's keys as the kernels read them: flat rows ``[Bk * Hkv * stride, ...]``, head ``kvh`` of
    batch row ``b`` starting at row ``(b * Hkv + kvh) * stride``.

    Attributes
    ----------
    keys, values : [N, D] float32, or uint16 (raw 16-bit floats, see ``half``)
    codes : [N, W] int64 -- hash codes (a ``[1, 1]`` dummy where none are needed)
    norms : [N] float32 -- ``|k - mu|`` (a ``[1]`` dummy where none are needed)
    half : int -- :func:`half_format` of K and V
    kv_heads, length, stride : int -- ``Hkv``, ``S`` and the rows between two heads' first keys (``S``,
        or a growing cache's capacity)
    """

    keys: np.ndarray
    values: np.ndarray
    codes: np.ndarray
    norms: np.ndarray
    half: int
    kv_heads: int
    length: int
    stride: int


_NO_CODES = np.zeros((1, 1), np.int64)
_NO_NORMS = np.zeros(1, np.float32)


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


def _check_kv(key: torch.Tensor, value: torch.Tensor, heads: int) -> None:
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 4 or heads % t.shape[1]:
            raise ValueError(f"{name} must be [B, Hkv, S, D] with H % Hkv == 0, got {tuple(t.shape)}")
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} do not match")


def _prefix_of(t: torch.Tensor | None, base: torch.Tensor | None, length: int) -> bool:
    """Whether ``t`` is the first ``length`` positions of buffer ``base`` ``[B, Hkv, capacity, ...]`` (as
    a :class:`~dashkv.cache.DashKVLayer` hands out); both None counts too."""
    if t is None or base is None:
        return t is None and base is None
    return t._base is base and t.shape[2] == length and t.data_ptr() == base.data_ptr() and t.stride() == base.stride()


def _flat(buffer: torch.Tensor) -> np.ndarray:
    return as_numpy(buffer).reshape(buffer.shape[0] * buffer.shape[1] * buffer.shape[2], *buffer.shape[3:])


def layer_rows(key: torch.Tensor, value: torch.Tensor, heads: int, codes: torch.Tensor | None = None,
               norms: torch.Tensor | None = None) -> KeyRows:  # fmt: skip
    """K, V (and the hash codes and norms, where given) ``[B, Hkv, S, ...]`` as :class:`KeyRows`.

    Prefix views of a growing cache's buffers (:class:`~dashkv.cache.DashKVLayer`) are read in place,
    and their rows are kept on the key buffer until the buffers change: the views a cache hands out
    are new tensors at every step, their buffers live until they grow. Other tensors are viewed or
    copied as :func:`key_rows` does."""
    seq = key.shape[2]
    base = key._base
    held = base.__dict__.get("_dashkv_rows") if base is not None else None
    if held is not None:
        vbase, cbase, nbase, rows = held
        if (
            _prefix_of(key, base, seq) and _prefix_of(value, vbase, seq) and _prefix_of(codes, cbase, seq)
            and _prefix_of(norms, nbase, seq)
        ):  # fmt: skip
            return rows._replace(length=seq)
    _check_kv(key, value, heads)
    if key.dtype != value.dtype or not key.dtype.is_floating_point:
        key, value = key.to(torch.float32), value.to(torch.float32)
    if codes is not None:
        check_codes(codes)
    if norms is not None and (norms.dtype != torch.float32 or tuple(norms.shape) != tuple(key.shape[:3])):
        norms = f32_keys(norms, tuple(key.shape[:3]))
    given = [t for t in (key, value, codes, norms) if t is not None]
    bases = [t._base for t in given]
    if all(b is not None and b.is_contiguous() and _prefix_of(t, b, seq) for t, b in zip(given, bases)) and len(
        {b.shape[2] for b in bases}
    ) == 1 and all(t.shape[:2] == b.shape[:2] and t.shape[3:] == b.shape[3:] for t, b in zip(given, bases)):
        arrays, stride = [_flat(b) for b in bases], bases[0].shape[2]
    else:
        flat, stride = key_rows(*(t.detach() for t in given))
        arrays, bases = [as_numpy(t) for t in flat], None
    k, v, *rest = arrays
    c = rest.pop(0) if codes is not None else _NO_CODES
    n = rest.pop(0) if norms is not None else _NO_NORMS
    rows = KeyRows(k, v, c, n, half_format(key.dtype), key.shape[1], seq, stride)
    if bases is not None:  # kept for the next steps over the same buffers
        extra = iter(bases[2:])
        bases[0]._dashkv_rows = (bases[1], next(extra) if codes is not None else None,
                                 next(extra) if norms is not None else None, rows)  # fmt: skip
    return rows


# --------------------------------------------------------------------------------- mask rows


class MaskRows(NamedTuple):
    """Visibility bytes of a mask broadcastable to ``[B, H, T, S]``.

    Attributes
    ----------
    vis : [Bm * Hm * Tm, S] uint8 -- :data:`HIDDEN_KEY`, :data:`ELIGIBLE_KEY` or :data:`ALWAYS_KEY`
    dims : [5] int64 -- ``(H, T, Bm, Hm, Tm)``, the row map of :func:`dashkv.ops.cpu.jit.mask_row`
    visible : int -- visible (query head, token, key) triples of the ``[B, H, T]`` block
    """

    vis: np.ndarray
    dims: np.ndarray
    visible: int


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


def visibility_bytes(visible: torch.Tensor, always: torch.Tensor | None) -> torch.Tensor:
    """One byte per key: :data:`HIDDEN_KEY`, :data:`ELIGIBLE_KEY`, or :data:`ALWAYS_KEY` (visible sinks
    and window)."""
    visible = visible.to(torch.bool)
    if always is None:
        return visible.to(torch.uint8)
    return visible.to(torch.uint8) + (visible & always.to(torch.bool))


def visible_count(vis: np.ndarray, dims: np.ndarray, rows_shape: tuple[int, int, int]) -> int:
    """Visible (query head, token, key) triples of a ``[B, H, T]`` block, from the mask rows."""
    per_row = np.count_nonzero(vis, axis=1).reshape(int(dims[2]), int(dims[3]), int(dims[4]))
    return int(np.broadcast_to(per_row, rows_shape).sum())


_MASKS: list[tuple] = []  # the last few masks' rows: every layer of a forward passes the same mask tensors


def mask_rows(visible: torch.Tensor | None, always: torch.Tensor | None, shape: tuple[int, int, int, int],
              heads: int, group: bool) -> MaskRows:  # fmt: skip
    """:class:`MaskRows` of ``visible`` and ``always`` for selection rows of ``shape`` (``[B, H or Hkv,
    T, S]``) and ``heads`` query heads; kept for the masks of the last few calls, since every layer of
    a forward passes the same mask tensors (a hit needs the very same tensor objects, unmodified)."""
    versions = (visible is None or visible._version, always is None or always._version)
    for entry in _MASKS:
        if entry[0] is visible and entry[1] is always and entry[2] == (shape, heads) and entry[3] == versions:
            return entry[4]
    vis_t = visible if visible is not None else torch.ones(1, 1, 1, shape[3], dtype=torch.bool)
    vis_bytes = visibility_bytes(vis_t, always)
    if group and vis_bytes.dim() == 4 and vis_bytes.shape[1] > 1 and vis_bytes.stride(1) != 0:
        raise ValueError("share='group' needs visible / always masks shared by all query heads ([B, 1, T, S])")
    vis, dims = mask_array(vis_bytes, shape, "visible / always")
    rows = MaskRows(vis, dims, visible_count(vis, dims, (shape[0], heads, shape[2])))
    _MASKS.insert(0, (visible, always, (shape, heads), versions, rows))
    del _MASKS[4:]
    return rows

