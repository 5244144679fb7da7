"""A transformers Cache whose layers keep packed key codes beside K and V.

Codes (and the centred key norms the mid tier uses) are computed once, when a key enters the cache,
and follow the keys through crop, beam reorder and batch selection. Nothing is ever evicted.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from dashkv.encoders import HashEncoders, LayerHashEncoder


class DashKVLayer(DynamicLayer):
    """A :class:`~transformers.cache_utils.DynamicLayer` that also stores key codes.

    Parameters
    ----------
    encoder : LayerHashEncoder or None
        The layer's encoder; ``None`` for layers that stay dense (no codes kept).
    """

    def __init__(self, encoder: LayerHashEncoder | None = None):
        super().__init__()
        self.encoder = encoder
        self.codes: torch.Tensor | None = None  # [B, Hkv, S, W] int64
        self.key_norms: torch.Tensor | None = None  # [B, Hkv, S] float32

    @classmethod
    def from_layer(cls, layer: DynamicLayer, encoder: LayerHashEncoder | None) -> "DashKVLayer":
        """Take over the K/V of an existing dynamic layer and encode its keys."""
        new = cls(encoder)
        if layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0:
            new.update(layer.keys, layer.values)
        return new

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, cache_kwargs)
        if self.encoder is not None:
            if self.encoder.key_proj.device != key_states.device:
                self.encoder.to(key_states.device)
            codes, norms = self.encoder.encode_key(key_states)
            self.codes = codes if self.codes is None else torch.cat([self.codes, codes], dim=-2)
            self.key_norms = norms if self.key_norms is None else torch.cat([self.key_norms, norms], dim=-1)
        return keys, values

    def crop(self, max_length: int) -> None:
        super().crop(max_length)
        if self.codes is not None:
            length = self.keys.shape[-2]
            self.codes, self.key_norms = self.codes[..., :length, :], self.key_norms[..., :length]

    def _index_batch(self, fn) -> None:
        if self.codes is not None:
            self.codes, self.key_norms = fn(self.codes), fn(self.key_norms)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._index_batch(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        super().reset()
        self.codes = self.key_norms = None


def _layer_encoders(encoders: HashEncoders, dense_layers: tuple[int, ...]) -> list[LayerHashEncoder | None]:
    return [None if i in dense_layers else enc for i, enc in enumerate(encoders.layers)]


class DashKVCache(DynamicCache):
    """The cache DASH-KV runs on: a :class:`~transformers.DynamicCache` of :class:`DashKVLayer`.

    ``enable`` creates one automatically when ``generate`` or ``forward`` gets no cache, and upgrades a
    plain ``DynamicCache`` in place; build one yourself to prefill a context and reuse it.

    Parameters
    ----------
    encoders : HashEncoders
    dense_layers : tuple of int
        Layers that stay dense and keep no codes.
    """

    def __init__(self, encoders: HashEncoders, dense_layers: tuple[int, ...] = ()):
        Cache.__init__(self, layers=[DashKVLayer(e) for e in _layer_encoders(encoders, dense_layers)])


def upgrade_cache(cache: Cache, encoders: HashEncoders, dense_layers: tuple[int, ...]) -> Cache:
    """Turn the layers of a plain dynamic cache into :class:`DashKVLayer` in place (encoding held keys).

    Raises
    ------
    ValueError
        For caches whose layers are not plain full-attention dynamic layers (static, sliding, quantized).
    """
    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"past_key_values of type {type(cache).__name__} cannot run DASH-KV; pass a DynamicCache or a "
            "dashkv.DashKVCache (or none, and one is created)"
        )
    per_layer = _layer_encoders(encoders, dense_layers)
    if cache.layer_class_to_replicate is not None and not cache.layers:
        cache.layers = [DashKVLayer(e) for e in per_layer]
        cache.layer_class_to_replicate = None
        return cache
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, DashKVLayer):
            continue
        if type(layer) is not DynamicLayer:
            raise ValueError(
                f"cache layer {i} is a {type(layer).__name__}; DASH-KV keeps every key and needs full "
                "(non-sliding, unquantized) DynamicLayer layers"
            )
        cache.layers[i] = DashKVLayer.from_layer(layer, per_layer[i] if i < len(per_layer) else None)
    return cache
