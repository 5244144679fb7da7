"""Block-sparse prefill: a block of consecutive queries attends exactly to keys chosen once for the block.

The tiered prefill (``prefill="tiered"``) gives every query its own tiers, so a chunk of 2048 queries
gathers K/V rows query by query; on 2 CPU cores that is slower than the one matrix product of dense
SDPA (``docs/speed.md``). Here the queries of a block of ``prefill_block`` consecutive positions share
one selection per KV head: the keys whose codes come nearest to any of the block's queries (the
smallest Hamming distance over the block's queries and the GQA group's heads,
``Backend.block_distance``). A key that one query needs is kept even when the block's other queries
ignore it (a copy or a retrieval), which a score summed over the block would dilute. The block
attends, with one SDPA matrix product per KV head, to that ``high + mid`` share of its prefix, the
sinks and a band from ``window`` keys before its first query to its last (causal inside); the other
keys are skipped for this block and stay in the cache. There is no estimated (mid) tier: the block
reads what the decode step's tiers would read, in one precision.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F

from dashkv.encoders import LayerHashEncoder

NOT_CANDIDATE = torch.iinfo(torch.int32).max  # the distance given to sinks and padding: never selected


def _rows(tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``tensor[b, h, positions[b, h, i]]``: Tensor[B, Hkv, S, ...] -> Tensor[B, Hkv, n, ...]."""
    batch, heads = positions.shape[:2]
    b = torch.arange(batch, device=positions.device).view(-1, 1, 1)
    h = torch.arange(heads, device=positions.device).view(1, -1, 1)
    return tensor[b, h, positions]


def choose_keys(dist: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` keys of smallest block distance: ``dist`` Tensor[B, Hkv, S'] int32 (one block's
    candidates; :data:`NOT_CANDIDATE` where a key is none) -> positions Tensor[B, Hkv, count] int64 and
    whether each is a candidate (a row with fewer candidates than ``count`` gets some that are not)."""
    top = dist.topk(count, dim=-1, largest=False, sorted=False)
    return top.indices, top.values != NOT_CANDIDATE


def block_prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_codes: torch.Tensor,
    encoder: LayerHashEncoder,
    visible: torch.Tensor,
    scaling: float,
    ops: ModuleType,
    *,
    share: float,
    sinks: int,
    window: int,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a chunk of queries over a cache, in blocks that share their key selection.

    Parameters
    ----------
    query : Tensor[B, H, T, D] -- the last ``T`` positions of the ``S`` keys
    key, value : Tensor[B, Hkv, S, D]
    key_codes : Tensor[B, Hkv, S, W] int64 -- codes of every key, the chunk's own included
    visible : Tensor[B, 1, T, S] bool -- which keys each query may see (causal and padding)
    ops : kernel backend (:class:`dashkv.ops.dispatch.Backend`): query codes and block distances
    share : fraction of a block's candidate keys (outside sinks and band) attended, in [0, 1]
    sinks, window, block : as in :class:`dashkv.config.DashKVConfig` (``prefill_block`` for ``block``)

    Returns
    -------
    (output Tensor[B, H, T, D] in the query's dtype, counts Tensor[3] int64: (query head, query, key)
    triples attended, estimated (always 0) and skipped, over the visible ones)
    """
    batch, heads, queries, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    offset = keys - queries  # position of the chunk's first query
    # each block scores the keys before its band only: the chunk's own keys up to its last block's band
    scored = max(0, min(keys, offset + (queries - 1) // block * block - window + 1))
    dist = ops.block_distance(ops.encode_query(encoder, query), key_codes[:, :, :scored], block)
    rows_visible = visible[:, 0]  # [B, T, S]
    first = rows_visible[:, -1].int().argmax(-1)  # first visible key of the last query: left padding
    sink_pos = (first.view(-1, 1) + torch.arange(sinks, device=key.device)).clamp(max=keys - 1)  # [B, sinks]
    never = torch.arange(scored, device=key.device).view(1, -1) < (first + sinks).view(-1, 1)
    dist = dist.masked_fill(never.view(batch, 1, 1, scored), NOT_CANDIDATE)
    sink_k, sink_v = key[:, :, :0], value[:, :, :0]
    if sinks:
        sink_idx = sink_pos.view(batch, 1, sinks).expand(-1, kv_heads, -1)
        sink_k, sink_v = _rows(key, sink_idx), _rows(value, sink_idx)
    # a query that sees no key (a padded position) gets zeros; a query that sees itself sees its band
    blind = not bool(rows_visible.diagonal(offset=offset, dim1=1, dim2=2).all())
    out = torch.empty_like(query)
    attended = 0
    for index, begin in enumerate(range(0, queries, block)):
        stop = min(begin + block, queries)
        rows = stop - begin
        lo = max(0, offset + begin - window + 1)  # the band: the first query's window to the last query
        hi = offset + stop
        vis = rows_visible[:, begin:stop]  # [B, Tb, S]
        sink_mask = vis.gather(2, sink_pos.unsqueeze(1).expand(-1, rows, -1)) & (sink_pos < lo).unsqueeze(1)
        parts_k, parts_v = [sink_k], [sink_v]
        parts_mask = [sink_mask.unsqueeze(1).expand(-1, kv_heads, -1, -1)]
        count = math.ceil(share * int((lo - (first + sinks)).clamp(min=0).max()))
        if count:
            chosen, real = choose_keys(dist[:, :, index, :lo], count)
            parts_k.append(_rows(key, chosen))
            parts_v.append(_rows(value, chosen))
            seen = _rows(vis.unsqueeze(1).expand(-1, kv_heads, -1, -1).transpose(2, 3), chosen).transpose(2, 3)
            parts_mask.append(seen & real.unsqueeze(2))
        parts_k.append(key[:, :, lo:hi])
        parts_v.append(value[:, :, lo:hi])
        parts_mask.append(vis[:, :, lo:hi].unsqueeze(1).expand(-1, kv_heads, -1, -1))
        mask = torch.cat(parts_mask, 3)  # [B, Hkv, Tb, N]
        attended += int(mask.count_nonzero()) * group
        # the group's query heads as one matrix of rows against their KV head's keys
        q = query[:, :, begin:stop].reshape(batch, kv_heads, group * rows, dim)
        mask = mask.unsqueeze(2).expand(-1, -1, group, -1, -1).reshape(batch, kv_heads, group * rows, -1)
        k, v = torch.cat(parts_k, 2), torch.cat(parts_v, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        if blind:
            o = torch.where(mask.any(-1, keepdim=True), o, 0)
        out[:, :, begin:stop] = o.view(batch, heads, rows, dim)
    total = int(rows_visible.count_nonzero()) * heads  # count_nonzero: 20x faster than a bool sum
    return out, torch.tensor([attended, 0, total - attended], dtype=torch.int64)
