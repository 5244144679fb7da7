"""Binary codes: the sign function, the slope schedule of its ``tanh(beta v)`` relaxation in training, and
bit packing.

Codes are stored packed, 64 bits to an ``int64`` word, least significant bit first. ``R`` bits take
``ceil(R / 64)`` words; unused high bits of the last word are zero so XOR + popcount stays exact.
"""

from __future__ import annotations

import torch

WORD_BITS = 64


def num_words(bits: int) -> int:
    """Number of int64 words that hold ``bits`` bits."""
    return (bits + WORD_BITS - 1) // WORD_BITS


def sign_bits(values: torch.Tensor) -> torch.Tensor:
    """Binary code of real values: ``True`` where ``values >= 0`` (so ``sign(0) = +1``).

    Parameters
    ----------
    values : Tensor[..., R], float

    Returns
    -------
    Tensor[..., R], bool
    """
    return values >= 0


def beta_schedule(step: int, total_steps: int, start: float = 1.0, end: float = 10.0) -> float:
    """Linear annealing of the tanh slope from ``start`` to ``end`` over ``total_steps``."""
    if total_steps <= 1:
        return end
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return start + (end - start) * frac


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(WORD_BITS, dtype=torch.int64, device=device)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack booleans into int64 words, least significant bit first.

    Parameters
    ----------
    bits : Tensor[..., R], bool

    Returns
    -------
    Tensor[..., ceil(R / 64)], int64
    """
    if bits.dtype != torch.bool:
        raise ValueError(f"bits must be a bool tensor, got dtype {bits.dtype}")
    r = bits.shape[-1]
    w = num_words(r)
    padded = torch.nn.functional.pad(bits.to(torch.int64), (0, w * WORD_BITS - r))
    padded = padded.reshape(*bits.shape[:-1], w, WORD_BITS)
    # distinct powers of two never carry, so the sum is the bitwise OR (bit 63 wraps to the sign bit)
    return (padded << _shifts(bits.device)).sum(-1)


def unpack_bits(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    Parameters
    ----------
    words : Tensor[..., W], int64
    bits : int
        Number of meaningful bits ``R`` (``W == ceil(R / 64)``).

    Returns
    -------
    Tensor[..., R], bool
    """
    expanded = (words.unsqueeze(-1) >> _shifts(words.device)) & 1
    return expanded.reshape(*words.shape[:-1], -1)[..., :bits].bool()


def to_signs(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map bool codes to ``+1 / -1`` values."""
    return bits.to(dtype) * 2 - 1
