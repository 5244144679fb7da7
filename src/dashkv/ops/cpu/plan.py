"""A layer's step prepared once for the compiled kernel: the query encoder's weights, the mid-tier
tables and the settings as the named tuples :func:`dashkv.ops.cpu.step.step_kernel` takes.

:func:`plan_layer` is the CPU backend's half of the plan / run split (:class:`dashkv.ops.reference.
LayerPlan`): what depends only on the layer's encoder and the config is converted here, once per layer
and ``enable`` block, so that a decode step converts only its own tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from dashkv.config import SHARING, check_choice
from dashkv.ops.cpu.encode import KeyEncoder, QueryEncoder, key_encoder, query_encoder
from dashkv.ops.cpu.step import Budget, Calibration, MidTier
from dashkv.ops.cpu.tables import byte_tables, cos_table
from dashkv.ops.reference import LayerPlan, MidTierWeights, StepSettings

class Prepared(NamedTuple):
    """The CPU backend's :attr:`LayerPlan.prepared`: the kernel's fixed inputs of one layer."""

    encoder: QueryEncoder
    keys: KeyEncoder
    budget: Budget
    calib: Calibration
    mid: MidTier
    scaling: np.float32
    decay: float
    want_prior: bool
    want_weights: bool


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).numpy())


_F1 = np.zeros(1, np.float32)
NO_MID = MidTier(False, np.zeros((1, 1), np.float32), _F1, _F1, _F1, _F1, np.zeros((1, 16, 256), np.float32), _F1,
                 _F1, 1)  # fmt: skip
NO_ROWS = np.zeros(1, np.int64)
NO_KEY_ENCODER = KeyEncoder(np.zeros((1, 1), np.float32), np.zeros((1, 1, 1), np.float32))
NO_MASK = np.zeros((1, 1), np.uint8)


def mid_tier(mid: MidTierWeights, heads: int, bits: int, words: int) -> MidTier:
    """The mid tier's per-head arrays (the query-side ones are computed in the step)."""
    if bits < 1 or bits > 64 * words or words > 2:
        raise ValueError(f"mid tier needs 1..{64 * words} bits in at most 2 words, got bits={bits}")
    phi = mid.residual.detach().to(torch.float32).reshape(heads, -1)[:, :bits].contiguous()
    empty = np.zeros(0, np.float32)
    return MidTier(
        True, _f32(mid.key_center.reshape(mid.key_center.shape[0], -1)), empty, empty,
        _f32(mid.temperature.expand(heads)), _f32(mid.bias.expand(heads)), byte_tables(phi.numpy()),
        phi.sum(-1).numpy(), cos_table(bits), bits,
    )  # fmt: skip


def plan_layer(encoder, settings: StepSettings, mid: MidTierWeights | None) -> LayerPlan:
    """The CPU plan of one layer: ``encoder`` (a :class:`~dashkv.encoders.LayerHashEncoder`, or None when
    every call brings its query codes), the step's settings and the mid-tier weights."""
    check_choice("share", settings.share, SHARING)
    if settings.spatial_step > 0 or settings.temporal_step > 0:
        raise ValueError(
            f"discounts must be <= 0, got spatial_step={settings.spatial_step}, temporal_step={settings.temporal_step}"
        )
    heads = int(encoder.num_heads) if encoder is not None else int(mid.temperature.numel()) if mid is not None else 0
    words = -(-settings.bits // 64)
    tier = mid_tier(mid, heads, settings.bits, words) if mid is not None and settings.mid > 0 else NO_MID
    prepared = Prepared(
        query_encoder(encoder), key_encoder(encoder) if encoder is not None else NO_KEY_ENCODER,
        Budget(True, float(settings.high), float(settings.mid), NO_ROWS, NO_ROWS),
        Calibration(int(settings.bits), settings.share == "group", int(settings.min_votes), int(settings.spatial_step),
                    int(settings.temporal_step), float(settings.momentum_ratio), NO_MASK, False,
                    settings.share == "union"),
        tier, np.float32(settings.scaling), float(settings.momentum_decay), bool(settings.want_prior),
        bool(settings.want_weights),
    )  # fmt: skip
    return LayerPlan(encoder, settings, mid, prepared)
