"""Cross-head consensus and cross-layer momentum: structural priors that correct coarse Hamming
distances, ``D_final = D_raw + delta_spatial + delta_temporal`` (both discounts <= 0).

Discounts are learned as real numbers and rounded to whole bits at inference, so calibrated distances
stay small integers in ``[lo, R]`` and tier thresholds still come from a histogram.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch


def consensus_mask(
    raw_dist: torch.Tensor,
    eligible: torch.Tensor,
    k_high: torch.Tensor,
    bits: int,
    vote_fraction: float,
    ops: ModuleType,
) -> torch.Tensor:
    """Keys that at least ``ceil(vote_fraction * H)`` query heads put among their high-tier candidates.

    Parameters
    ----------
    raw_dist : Tensor[B, H, T, S], int32
    eligible : Tensor[B, 1, T, S], bool
    k_high : Tensor[B, 1, T], int64 -- each head's candidate count

    Returns
    -------
    Tensor[B, 1, T, S], bool
    """
    votes = ops.select_smallest(raw_dist, eligible, k_high, 0, bits).sum(1, keepdim=True)
    return votes >= vote_threshold(raw_dist.shape[1], vote_fraction)


def vote_threshold(heads: int, vote_fraction: float) -> int:
    """Votes a key needs for the spatial discount: ``ceil(vote_fraction * H)``, at least one."""
    return max(1, math.ceil(vote_fraction * heads - 1e-9))


def whole_bits(discount: float) -> int:
    """A learned discount as applied: rounded to whole bits, never positive."""
    return int(round(min(discount, 0.0)))


def update_prior(prior: torch.Tensor | None, probs: torch.Tensor, decay: float) -> torch.Tensor:
    """Running attention prior across layers of one step: ``decay * prior + (1 - decay) * mean_h(probs)``.

    Parameters
    ----------
    prior : Tensor[B, T, S] or None (first layer of the step, or the key count changed)
    probs : Tensor[B, H, T, S], float32 -- this layer's attention weights

    Returns
    -------
    Tensor[B, T, S], float32
    """
    current = probs.mean(1)
    if prior is None or prior.shape != current.shape:
        return current
    return decay * prior + (1.0 - decay) * current


def momentum_mask(prior: torch.Tensor, visible: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keys whose prior attention exceeds ``ratio`` times the uniform share of the visible keys.

    Parameters
    ----------
    prior : Tensor[B, T, S], float32
    visible : Tensor[B, 1, T, S], bool

    Returns
    -------
    Tensor[B, 1, T, S], bool
    """
    count = visible.sum(-1, keepdim=True).clamp(min=1)
    return (prior.unsqueeze(1) * count >= ratio) & visible


def calibrate(
    raw_dist: torch.Tensor,
    spatial: torch.Tensor | None,
    temporal: torch.Tensor | None,
    spatial_discount: float,
    temporal_discount: float,
) -> tuple[torch.Tensor, int]:
    """Apply the discounts, rounded to whole bits.

    Parameters
    ----------
    raw_dist : Tensor[B, H, T, S], int32
    spatial, temporal : Tensor[B, 1, T, S] bool or None

    Returns
    -------
    dist : Tensor[B, H, T, S], int32
    lo : int -- the smallest value ``dist`` can take (``<= 0``)
    """
    dist, lo = raw_dist, 0
    for mask, discount in ((spatial, spatial_discount), (temporal, temporal_discount)):
        step = whole_bits(discount)
        if mask is not None and step != 0:
            dist = dist + mask.to(torch.int32) * step
            lo += step
    return dist, lo
