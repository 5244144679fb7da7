"""An exact chunked prefill: a long prompt fed to the model a chunk at a time, then ``generate``.

A single-shot prefill of a 32K prompt holds every layer's activations (and, through the logits,
``T x vocab`` floats: 32 GB at Gemma's 262K vocabulary) at once. Feeding the prompt in chunks, each at
its true positions (``cache_position`` and ``position_ids``) over the cache the earlier chunks filled,
computes the same thing within float rounding. transformers' own ``generate(prefill_chunk_size=N)`` is
not used: in transformers 5.2 it gives every chunk but the last wrong positions.

Under ``dashkv.enable`` a chunk after the first is a block of queries over a cached prefix, which goes
through the tiers; for a dense (exact) prefill of the context, prefill before the ``with`` block and
generate inside it with the returned cache (``enable`` encodes the keys it holds).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache


def _positions(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """``position_ids`` [B, L] of the whole prompt: left padding is skipped, as ``generate`` does."""
    if attention_mask is None:
        return torch.arange(length, device=device).expand(batch, -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def chunked_prefill(
    model: nn.Module,
    input_ids: torch.Tensor,
    chunk_size: int = 1024,
    past_key_values: Cache | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[Cache, torch.Tensor]:
    """Run ``input_ids`` through ``model`` in chunks of ``chunk_size`` tokens.

    Parameters
    ----------
    input_ids : LongTensor[B, L]
    chunk_size : int >= 1
    past_key_values : Cache or None
        Filled in place; ``None`` makes ``DynamicCache(config=model.config)`` (what the model would make).
        It must be empty: the prompt starts at position 0.
    attention_mask : Tensor[B, L] or None
        1 for tokens, 0 for (left) padding.

    Returns
    -------
    (cache, logits) -- the filled cache and the logits of the last position, Tensor[B, V] float.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be a LongTensor [batch, length >= 1]; got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")  # fmt: skip
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is not allowed; chunk_size must be an integer >= 1")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; it must match input_ids "
                         f"{tuple(input_ids.shape)}")  # fmt: skip
    cache = past_key_values if past_key_values is not None else DynamicCache(config=model.config)
    if cache.get_seq_length() != 0:
        raise ValueError(f"past_key_values holds {cache.get_seq_length()} tokens; chunked_prefill starts from "
                         "an empty cache (the prompt's positions begin at 0)")  # fmt: skip
    batch, length = input_ids.shape
    positions = _positions(attention_mask, batch, length, input_ids.device)
    # only the last position's logits are needed: the whole chunk's would be chunk x vocab floats
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    logits = None
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        out = model(
            input_ids=input_ids[:, start:end],
            attention_mask=None if attention_mask is None else attention_mask[:, :end],
            position_ids=positions[:, start:end],
            cache_position=torch.arange(start, end, device=input_ids.device),
            past_key_values=cache, use_cache=True, **extra,
        )  # fmt: skip
        logits = out.logits[:, -1]
    return cache, logits


@torch.no_grad()
def generate_chunked(
    model: nn.Module,
    input_ids: torch.Tensor,
    chunk_size: int = 1024,
    attention_mask: torch.Tensor | None = None,
    past_key_values: Cache | None = None,
    **generate_kwargs,
) -> torch.Tensor:
    """``model.generate`` after a chunked prefill of all prompt tokens but the last.

    ``generate`` then finds the prompt cached up to its last token and starts from there, at the right
    positions. Returns what ``generate`` returns (by default LongTensor[B, L + new]).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [batch, length >= 2] for a chunked prefill; got {tuple(input_ids.shape)}")
    head_mask = None if attention_mask is None else attention_mask[:, :-1]
    cache, _ = chunked_prefill(model, input_ids[:, :-1], chunk_size, past_key_values, head_mask)
    if attention_mask is not None:
        generate_kwargs["attention_mask"] = attention_mask
    return model.generate(input_ids, past_key_values=cache, **generate_kwargs)
