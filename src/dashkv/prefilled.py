"""A densely prefilled context: what every evaluated method builds its cache from.

It sits below both :mod:`dashkv.baselines` (each method's ``build_cache`` takes one) and
:mod:`dashkv.eval` (the suites make one per sample), so neither package imports the other for it.
The protocol that uses it is described in :mod:`dashkv.eval.protocol`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from dashkv.prefill import chunked_prefill


@dataclass
class Prefill:
    """A densely prefilled context.

    Attributes
    ----------
    ids : Tensor[1, L], int64 -- context tokens
    cache : DynamicCache -- K/V of the context (never modified by methods: they copy)
    scores : dict -- press name -> list over layers of Tensor[1, Hkv, L] key scores (higher = keep)
    """

    ids: torch.Tensor
    cache: DynamicCache
    scores: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    derived: dict = field(default_factory=dict)  # caches built from this prefill, reused by methods

    def reuse(self, key, build: Callable[[], object]):
        """The cache stored under ``key`` (built once by ``build()``), cropped back to the context:
        methods append the question and answer tokens to it, and cropping removes them again."""
        cache = self.derived.get(key)
        if cache is None:
            cache = self.derived[key] = build()
        else:
            cache.crop(self.length)
        return cache

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])

    def keys_values(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for layer in self.cache.layers:
            yield layer.keys, layer.values


@torch.no_grad()
def prefill(model, ids: torch.Tensor, recorder: Callable[[dict], AbstractContextManager] | None = None,
            chunk_size: int | None = None) -> Prefill:  # fmt: skip
    """Prefill ``ids`` [1, L] densely through the base model (no LM head); ``recorder(scores)`` is
    entered around the forward and may fill ``scores`` (kvpress scorers, see ``baselines.presses``).
    ``chunk_size``: prefill in chunks of that many tokens (:func:`dashkv.prefill.chunked_prefill`, the
    same K/V within rounding); kvpress scores only a single-shot prefill, so no ``recorder`` then."""
    cache = DynamicCache()
    if chunk_size is not None:
        if recorder is not None:
            raise ValueError("recorder: kvpress scores a single-shot prefill only; pass chunk_size=None")
        chunked_prefill(model, ids, chunk_size, cache)
        return Prefill(ids, cache, {})
    scores: dict[str, list[torch.Tensor]] = {}
    if recorder is not None:
        with recorder(scores):
            model.model(input_ids=ids, past_key_values=cache)
    else:
        model.model(input_ids=ids, past_key_values=cache)
    return Prefill(ids, cache, scores)
