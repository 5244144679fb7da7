"""What every evaluated method provides: a cache built from the shared dense prefill, and a context
in which the question and answer tokens run."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from dashkv.prefilled import Prefill


class LayersCache(DynamicCache):
    """A :class:`~transformers.DynamicCache` over given layer objects (compressed, quantized, ...)."""

    def __init__(self, layers: list[DynamicLayer]):
        Cache.__init__(self, layers=layers)


class EvictedLayer(DynamicLayer):
    """A cache layer holding what is left after ``evicted`` context keys were dropped: it counts them in
    ``get_seq_length``, so the next tokens get their true cache positions whichever layer is asked, and
    offsets its mask by them, so the keys it holds stay causal. A model with layers of different lengths
    (pressed full-attention layers beside whole sliding-window ones) is then masked right in each; with
    a plain ``DynamicLayer`` a block's queries would see its later tokens."""

    def __init__(self, evicted: int):
        super().__init__()
        self.evicted = evicted

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.evicted

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return super().get_seq_length() + cache_position.shape[0], self.evicted


def copy_layers(pairs, layer_cls=DynamicLayer, **kwargs) -> list[DynamicLayer]:
    """Fresh layers holding copies of ``(keys, values)`` pairs (``update`` concatenates into new tensors)."""
    layers = []
    for keys, values in pairs:
        layer = layer_cls(**kwargs)
        layer.update(keys, values)
        layers.append(layer)
    return layers


@dataclass
class Method:
    """Full attention, and the base of every other method.

    Attributes
    ----------
    name : str -- the row label (``"full"``, ``"dashkv"``, ``"snapkv"``, ...)
    budget : float or None -- the budget share (None: the method has no budget)
    presses : tuple of str -- kvpress scorers whose prefill scores the method needs
    """

    name: str = "full"
    budget: float | None = None
    presses: tuple[str, ...] = field(default=())

    def build_cache(self, model, prefill: Prefill) -> Cache:
        return LayersCache(copy_layers(prefill.keys_values()))

    def context(self, model) -> AbstractContextManager:
        return nullcontext()

    def describe(self, prefill: Prefill) -> dict:
        """What the method kept of the context (for the record)."""
        return {"kept": prefill.length, "kept_share": 1.0}


def gather_keys(keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V [B, Hkv, L, D] at ``indices`` [B, Hkv, n] per KV head (kept in position order)."""
    indices = indices.sort(dim=-1).values.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    return keys.gather(2, indices).contiguous(), values.gather(2, indices).contiguous()
