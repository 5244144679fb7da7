"""A transformers Cache that grows in place and keeps packed key codes beside K and V.

Codes (and the centred key norms the mid tier uses) are computed once, when a key enters the cache,
and follow the keys through crop, beam reorder and batch selection. Nothing is ever evicted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from dashkv.encoders import HashEncoders, LayerHashEncoder
from dashkv.ops.dispatch import get_backend


class DashKVLayer(DynamicLayer):
    """A cache layer that grows in place and, for tiered layers, keeps each key's packed code.

    K, V, codes and norms live in preallocated buffers ``[B, Hkv, capacity, ...]``; ``keys``,
    ``values``, ``codes`` and ``key_norms`` are views of their first ``length`` positions. Appending
    writes into the buffers (amortised O(1): the capacity doubles when it runs out) instead of
    concatenating the whole prefix, which transformers' ``DynamicLayer`` does at every step. The
    views are strided across heads (head stride ``capacity``); the CPU kernels read them as they are.

    Codes are computed when first read, for every key added since the last read (one batch after a
    prefill, one key a decode step): a context shorter than ``DashKVConfig.dense_below`` attends
    exactly and never pays for them.

    Parameters
    ----------
    encoder : LayerHashEncoder or None
        The layer's encoder; ``None`` keeps K and V only (dense layers, or plain full attention).
    """

    def __init__(self, encoder: LayerHashEncoder | None = None):
        super().__init__()
        self.encoder = encoder
        self.length = 0
        self.coded = 0  # keys [0, coded) have their codes in the buffers
        self._buffers: dict[str, torch.Tensor] = {}  # "keys", "values"[, "codes", "key_norms"]
        self._encode = None  # the backend's encode_key for the keys' device, found at the first encoding

    @classmethod
    def from_layer(cls, layer: DynamicLayer, encoder: LayerHashEncoder | None) -> "DashKVLayer":
        """Take over the K/V of an existing dynamic layer (copied into buffers); codes follow on reading."""
        new = cls(encoder)
        if layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0:
            new.update(layer.keys, layer.values)
        return new

    def attach(self, encoder: LayerHashEncoder | None) -> None:
        """Give a layer without codes its encoder; the keys it holds are coded when codes are read."""
        if encoder is None or self.encoder is not None:
            return
        self.encoder, self.coded = encoder, 0

    @property
    def capacity(self) -> int:
        """Positions the buffers hold before they must grow."""
        return self._buffers["keys"].shape[2] if self._buffers else 0

    @property
    def codes(self) -> torch.Tensor | None:
        """``[B, Hkv, S, W]`` int64 packed key codes (None without an encoder)."""
        return self._coded("codes")

    @property
    def key_norms(self) -> torch.Tensor | None:
        """``[B, Hkv, S]`` float32 centred key norms ``|k - mu|`` (None without an encoder)."""
        return self._coded("key_norms")

    def _coded(self, name: str) -> torch.Tensor | None:
        """The view of buffer ``name`` over every key, once the keys added since the last read are coded."""
        if self.encoder is None or not self.length:
            return None
        self._encode_pending()
        return self._buffers[name][:, :, : self.length]

    def code_views(self, pending: int = 64) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Views of the codes and norms buffers ``[B, Hkv, S, ...]`` and the first key without its code:
        the keys from there on are left to the caller to code into the views (a decode step's new key),
        unless there are more than ``pending`` of them (after a prefill): those are coded here, in one
        batch. The caller marks them coded (:meth:`mark_coded`) once written."""
        if self.length - self.coded > pending:
            self._encode_pending()
        else:
            self._allocate_codes()
        buffers = self._buffers
        return buffers["codes"][:, :, : self.length], buffers["key_norms"][:, :, : self.length], self.coded

    def mark_coded(self) -> None:
        """Every key has its code in the buffers (a caller of :meth:`code_views` wrote the rest)."""
        self.coded = self.length

    def _allocate_codes(self) -> None:
        if "codes" not in self._buffers:
            keys = self._buffers["keys"]
            words = -(-self.encoder.bits // 64)
            self._buffers["codes"] = torch.empty((*keys.shape[:3], words), dtype=torch.int64, device=keys.device)
            self._buffers["key_norms"] = torch.empty(keys.shape[:3], dtype=torch.float32, device=keys.device)

    def _encode_pending(self) -> None:
        """Codes and norms of the keys ``[coded, length)``, written into their buffers."""
        if self.coded >= self.length:
            return
        keys = self._buffers["keys"]
        if self._encode is None or self.encoder.key_proj.device != keys.device:
            self.encoder.to(keys.device)
            self._encode = get_backend("auto", keys.device).encode_key
        codes, norms = self._encode(self.encoder, keys[:, :, self.coded : self.length])
        self._allocate_codes()
        self._buffers["codes"][:, :, self.coded : self.length] = codes
        self._buffers["key_norms"][:, :, self.coded : self.length] = norms
        self.coded = self.length

    def _grow(self, needed: int, like: torch.Tensor) -> None:
        """(Re)allocate the buffers for at least ``needed`` positions, keeping the first ``length``; new K
        and V buffers take ``like``'s batch, heads, dtype and device."""
        # a first allocation (the prefill) leaves room for a quarter more tokens, so that decoding after
        # it does not double the cache at once; later growth doubles (amortised O(1) appends)
        capacity = max(needed, 2 * self.capacity) if self.capacity else needed + max(256, needed // 4)
        capacity = -(-capacity // 64) * 64  # whole cache lines of positions
        if not self.length:
            self._buffers, self.coded = {}, 0
        grown = {}
        for name in ("keys", "values", *(n for n in ("codes", "key_norms") if n in self._buffers)):
            old = self._buffers.get(name)
            template = old if old is not None else like
            buffer = torch.empty((*template.shape[:2], capacity, *template.shape[3:]), dtype=template.dtype,
                                 device=template.device)  # fmt: skip
            if old is not None and self.length:
                buffer[:, :, : self.length] = old[:, :, : self.length]
            grown[name] = buffer
        self._buffers = grown

    def _refresh_views(self) -> None:
        n, buffers = self.length, self._buffers
        self.keys, self.values = buffers["keys"][:, :, :n], buffers["values"][:, :, :n]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states`` / ``value_states`` ``[B, Hkv, T, D]`` in place (their codes follow on
        reading); returns views of the whole cached K and V ``[B, Hkv, S, D]``."""
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True
        end = self.length + key_states.shape[-2]
        held = self._buffers.get("keys")
        fits = held is not None and held.shape[:2] == key_states.shape[:2] and held.dtype == key_states.dtype
        if not fits and self.length:
            raise ValueError(
                f"cache layer holds batch x heads {tuple(held.shape[:2])} in {held.dtype}; got states "
                f"{tuple(key_states.shape[:2])} in {key_states.dtype}"
            )
        if not fits or end > held.shape[2]:
            self._grow(end, key_states)
        self._buffers["keys"][:, :, self.length : end] = key_states
        self._buffers["values"][:, :, self.length : end] = value_states
        self.length = end
        self._refresh_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.length - abs(max_length)
        if self.length > max_length:
            self.length = max(max_length, 0)
            self.coded = min(self.coded, self.length)
            self._refresh_views()

    def _index_batch(self, fn) -> None:
        """Apply a batch-axis operation to every buffer (the capacity is kept)."""
        if self.length:
            self._buffers = {name: fn(buffer) for name, buffer in self._buffers.items()}
            self._refresh_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def offload(self) -> None:
        if self.length:
            self._index_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.length and self.keys.device != self.device:
            self._index_batch(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self.length = self.coded = 0
        if self._buffers:
            self._refresh_views()


def _layer_encoders(encoders: HashEncoders, dense_layers: tuple[int, ...]) -> list[LayerHashEncoder | None]:
    """Each layer's encoder, None for the layers that stay dense (``dense_layers`` and the encoders' own)."""
    dense = set(dense_layers) | set(encoders.dense_layers)
    return [None if i in dense else enc for i, enc in enumerate(encoders.layers)]


class DashKVCache(DynamicCache):
    """The cache DASH-KV runs on: a :class:`~transformers.DynamicCache` of :class:`DashKVLayer`.

    ``enable`` creates one automatically when ``generate`` or ``forward`` gets no cache, and upgrades a
    plain ``DynamicCache`` in place; build one yourself to prefill a context and reuse it.
    ``DashKVCache(None)`` is the same in-place cache without codes, for plain full attention (it
    removes the per-step copy of the whole K and V that ``DynamicCache`` makes).

    Parameters
    ----------
    encoders : HashEncoders or None
        ``None``: no codes anywhere (layers are added as the model uses them).
    dense_layers : tuple of int
        Layers that stay dense and keep no codes.
    config : the model's config or None
        Where it marks layers as sliding (:func:`dashkv.models.sliding_windows`), those layers get
        transformers' own ``DynamicSlidingWindowLayer``, as ``DynamicCache(config=...)`` gives them;
        without it every layer keeps all its keys.
    """

    def __init__(self, encoders: HashEncoders | None, dense_layers: tuple[int, ...] = (), config=None):
        from dashkv.models import sliding_windows

        windows = sliding_windows(config) if config is not None else {}
        if encoders is None and not windows:
            Cache.__init__(self, layer_class_to_replicate=DashKVLayer)
            return
        count = len(encoders.layers) if encoders is not None else config.get_text_config(decoder=True).num_hidden_layers
        per_layer = _layer_encoders(encoders, dense_layers) if encoders is not None else [None] * count
        Cache.__init__(self, layers=[
            DynamicSlidingWindowLayer(windows[i]) if i in windows else DashKVLayer(e) for i, e in enumerate(per_layer)
        ])  # fmt: skip


def upgrade_cache(
    cache: Cache, encoders: HashEncoders, dense_layers: tuple[int, ...], sliding: Mapping[int, int] | None = None
) -> Cache:
    """Turn the layers of a plain dynamic cache into :class:`DashKVLayer` in place (encoding held keys).

    ``sliding`` (``{layer: window}``, :func:`dashkv.models.sliding_windows`): the model's sliding-window
    layers, left as they are (transformers runs them); an empty :class:`DashKVLayer` there (a
    ``DashKVCache`` made without ``config=``) becomes transformers' ``DynamicSlidingWindowLayer``.

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
    sliding = sliding or {}
    per_layer = _layer_encoders(encoders, dense_layers)
    if cache.layer_class_to_replicate is not None and not cache.layers:
        # sliding layers: what the cache would have made itself
        replicate = cache.layer_class_to_replicate
        cache.layers = [replicate() if i in sliding else DashKVLayer(e) for i, e in enumerate(per_layer)]
        cache.layer_class_to_replicate = None
        return cache
    for i, layer in enumerate(cache.layers):
        if i in sliding:
            if isinstance(layer, DashKVLayer) and not layer.is_initialized:
                cache.layers[i] = DynamicSlidingWindowLayer(sliding[i])
            continue
        encoder = per_layer[i] if i < len(per_layer) else None
        if isinstance(layer, DashKVLayer):
            layer.attach(encoder)
            continue
        if type(layer) is not DynamicLayer:
            raise ValueError(
                f"cache layer {i} is a {type(layer).__name__}; DASH-KV keeps every key and needs full "
                "(non-sliding, unquantized) DynamicLayer layers"
            )
        cache.layers[i] = DashKVLayer.from_layer(layer, encoder)
    return cache
