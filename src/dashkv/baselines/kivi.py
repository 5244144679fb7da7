"""KIVI-style 2-bit KV-cache quantization (Liu et al., 2024), simulated on CPU.

transformers' ``QuantizedCache`` needs optimum-quanto or HQQ (not installed here, and both quantize
keys and values along the same axis, unlike KIVI). This module implements KIVI's scheme directly:

- keys are quantized **per channel**: each channel of each group of ``group_size`` consecutive tokens
  gets its own zero point and scale (key outliers live in a few channels);
- values are quantized **per token**: each group of ``group_size`` channels of a token gets its own;
- the most recent tokens (``residual`` to ``residual + group_size - 1`` of them) stay in full
  precision; when the full-precision tail reaches ``residual + group_size`` tokens, its oldest
  ``group_size`` tokens are quantized.

Quantization is asymmetric min-max rounding to ``2 ** bits`` levels, stored dequantized ("fake
quantization"): the attention sees exactly the values a KIVI kernel would reconstruct. KIVI has no
key budget; its memory is about ``bits / 16`` of an fp16 cache plus the zero points, scales and tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from dashkv.baselines.method import LayersCache, Method
from dashkv.prefilled import Prefill


def fake_quantize(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Min-max quantize ``x`` to ``2**bits`` levels with one zero point and scale per slice along
    ``dim`` (the statistics are reduced over ``dim``), then dequantize."""
    low = x.amin(dim=dim, keepdim=True)
    high = x.amax(dim=dim, keepdim=True)
    scale = (high - low).clamp(min=1e-8) / (2**bits - 1)
    return ((x - low) / scale).round().clamp(0, 2**bits - 1) * scale + low


def quantize_keys(keys: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per-channel: keys [B, Hkv, n * group_size, D], statistics over each group's tokens."""
    b, h, n, d = keys.shape
    grouped = keys.reshape(b, h, n // group_size, group_size, d)
    return fake_quantize(grouped, bits, dim=3).reshape(b, h, n, d)


def quantize_values(values: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per-token: values [B, Hkv, n, D] with ``D % group_size == 0``, statistics over channel groups."""
    b, h, n, d = values.shape
    group = min(group_size, d)
    grouped = values.reshape(b, h, n, d // group, group)
    return fake_quantize(grouped, bits, dim=4).reshape(b, h, n, d)


class KIVILayer(DynamicLayer):
    """A cache layer holding KIVI-quantized K/V (dequantized) and a full-precision recent tail.

    Parameters
    ----------
    bits : int -- 2 in KIVI-2
    group_size : int -- tokens per key group, channels per value group (KIVI: 32)
    residual : int -- recent tokens kept in full precision (KIVI: 128)
    """

    def __init__(self, bits: int = 2, group_size: int = 32, residual: int = 128):
        super().__init__()
        if bits < 1 or group_size < 1 or residual < 0:
            raise ValueError(f"bits={bits}, group_size={group_size}, residual={residual}: need bits, group_size >= 1, residual >= 0")
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.full_precision = 0  # tokens at the end still in full precision

    def update(self, key_states, value_states, cache_kwargs=None):
        keys, values = super().update(key_states, value_states, cache_kwargs)
        self.full_precision += key_states.shape[-2]
        spill = (self.full_precision - self.residual) // self.group_size * self.group_size
        if spill > 0:
            start = keys.shape[-2] - self.full_precision
            span = slice(start, start + spill)
            self.keys[..., span, :] = quantize_keys(self.keys[..., span, :], self.bits, self.group_size)
            self.values[..., span, :] = quantize_values(self.values[..., span, :], self.bits, self.group_size)
            self.full_precision -= spill
        return self.keys, self.values


@dataclass
class KIVIMethod(Method):
    """KIVI-2 (per-channel keys, per-token values, full-precision tail): the quantization baseline."""

    bits: int = 2
    group_size: int = 32
    residual: int = 128

    def build_cache(self, model, prefill: Prefill) -> Cache:
        layers = []
        for keys, values in prefill.keys_values():
            layer = KIVILayer(self.bits, self.group_size, self.residual)
            layer.update(keys, values)
            layers.append(layer)
        return LayersCache(layers)

    def describe(self, prefill: Prefill) -> dict:
        return {"kept": prefill.length, "kept_share": 1.0, "bits": self.bits}
