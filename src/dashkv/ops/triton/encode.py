"""Codes of new keys on the GPU: centring, projection, sign and bit packing in one kernel.

Query codes use the encoder's own torch code (:meth:`LayerHashEncoder.encode_query`): its three matrix
products run on cuBLAS, and a decode step encodes only a few query rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dashkv.codes import num_words
from dashkv.ops.triton.common import pow2
from dashkv.ops.triton.launch import check_device


@triton.jit
def key_code_kernel(
    k_ptr, ksb, ksh, kss, ksd, center_ptr, proj_ptr, codes_ptr, norms_ptr, HKV, S, D,
    R: tl.constexpr, W: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``codes [B, HKV, S, W]`` = packed ``sign(proj (k - mu)) >= 0`` (bit r of word r // 64, least
    significant first) and ``norms [B, HKV, S] = |k - mu|``. Grid: ``(B * HKV, cdiv(S, BLOCK_S))``."""
    pid = tl.program_id(0)
    b = (pid // HKV).to(tl.int64)
    kvh = pid % HKV
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    rmask = rows < S
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < D
    key = tl.load(k_ptr + b * ksb + kvh * ksh + rows[:, None].to(tl.int64) * kss + dims[None, :] * ksd,
                  mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
    center = tl.load(center_ptr + kvh * D + dims, mask=dmask, other=0.0)
    centred = tl.where(dmask[None, :], key - center[None, :], 0.0)
    out = (b * HKV + kvh) * S + rows
    tl.store(norms_ptr + out, tl.sqrt(tl.sum(centred * centred, 1)), mask=rmask)
    shifts = tl.arange(0, 64)
    for w in tl.static_range(W):
        r = w * 64 + shifts
        weights = tl.load(proj_ptr + (kvh * R + r[:, None]) * D + dims[None, :],
                          mask=(r < R)[:, None] & dmask[None, :], other=0.0)  # fmt: skip
        values = tl.dot(centred, tl.trans(weights), input_precision="ieee")
        bit = ((values >= 0) & (r < R)[None, :]).to(tl.int64)
        tl.store(codes_ptr + out * W + w, tl.sum(bit << shifts[None, :].to(tl.int64), 1), mask=rmask)


def encode_query(encoder, query: torch.Tensor) -> torch.Tensor:
    """Packed query codes ``[B, H, T, W]`` int64 (the encoder's torch code)."""
    return encoder.encode_query(query)


@torch.no_grad()
def encode_key(encoder, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed key codes ``[B, Hkv, S, W]`` int64 and centred norms ``[B, Hkv, S]`` float32 of ``key``
    (see :meth:`dashkv.encoders.LayerHashEncoder.encode_key`), in one kernel."""
    check_device(key=key)
    if key.dim() != 4:
        raise ValueError(f"key must be [B, Hkv, S, D], got shape {tuple(key.shape)}")
    nbatch, kheads, seq, dim = key.shape
    bits = int(encoder.bits)
    words = num_words(bits)
    center = encoder.key_center.detach().to(device=key.device, dtype=torch.float32).contiguous()
    proj = encoder.key_proj.detach().to(device=key.device, dtype=torch.float32).contiguous()
    codes = torch.empty(nbatch, kheads, seq, words, dtype=torch.int64, device=key.device)
    norms = torch.empty(nbatch, kheads, seq, dtype=torch.float32, device=key.device)
    if codes.numel() == 0:
        return codes, norms
    block_s = 32
    key_code_kernel[(nbatch * kheads, triton.cdiv(seq, block_s))](
        key, *key.stride(), center, proj, codes, norms, kheads, seq, dim,
        R=bits, W=words, BLOCK_S=block_s, BLOCK_D=pow2(dim, 16),
    )  # fmt: skip
    return codes, norms
