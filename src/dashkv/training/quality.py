"""Held-out quality of encoders: attention-mass recall of the tiers against the teacher.

Recall counts only keys outside the sinks and the local window (those are always kept, so they hide
the difference between selectors): the share of the teacher's mass on that eligible set which falls
on the keys a selector picks.
"""

from __future__ import annotations

import torch

from dashkv.encoders import LayerHashEncoder
from dashkv.ops.dispatch import get_backend
from dashkv.ops.reference import budget_counts, expand_kv, group_distance, union_tiers


def eligible_mask(positions: torch.Tensor, length: int, sinks: int, window: int) -> torch.Tensor:
    """Keys a query may select: ``sinks <= j <= position - window``. Tensor[n, L] bool."""
    j = torch.arange(length, device=positions.device).view(1, -1)
    return (j >= sinks) & (j <= positions.view(-1, 1) - window)


def visible_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    return torch.arange(length, device=positions.device).view(1, -1) <= positions.view(-1, 1)


def teacher_probs(queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scaling: float) -> torch.Tensor:
    """Exact attention of the sampled queries: Tensor[H, n, L] from queries [H, n, D], keys [Hkv, L, D]."""
    logits = queries @ expand_kv(keys.unsqueeze(0), queries.shape[0])[0].transpose(-1, -2) * scaling
    visible = visible_mask(positions, keys.shape[1])
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)


def mass_recall(probs: torch.Tensor, selected: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``P(selected) / P(eligible)`` (rows with no eligible mass are skipped)."""
    total = (probs * eligible).sum(-1)
    picked = (probs * (selected & eligible)).sum(-1)
    keep = total > 0
    return (picked[keep] / total[keep]).mean()


@torch.no_grad()
def recall_at(
    encoder: LayerHashEncoder | None,
    queries: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    fraction: float,
    sinks: int,
    window: int,
    scaling: float,
    share: str = "head",
) -> float:
    """Recall of the top ``fraction`` of eligible keys by Hamming distance (``encoder``) or, with
    ``encoder=None``, by exact ``q.k`` (the oracle), the hashed selection shared in a GQA group as
    ``share`` (``DashKVConfig.share``) says.

    queries [H, n, D], keys [Hkv, L, D], positions [n].
    """
    probs = teacher_probs(queries, keys, positions, scaling)
    return recalls_at(encoder, queries, keys, positions, (fraction,), sinks, window, probs, share)[0]


@torch.no_grad()
def recalls_at(
    encoder: LayerHashEncoder | None,
    queries: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    fractions: tuple[float, ...],
    sinks: int,
    window: int,
    probs: torch.Tensor,
    share: str = "head",
) -> list[float]:
    """:func:`recall_at` for several budgets, ranking the keys once; ``probs`` the teacher's
    attention (:func:`teacher_probs` of the same vectors)."""
    heads, (kv_heads, length) = queries.shape[0], keys.shape[:2]
    eligible = eligible_mask(positions, length, sinks, window).unsqueeze(0)  # [1, n, L]
    if encoder is None:
        scores = torch.where(eligible, probs, torch.full_like(probs, -1.0))
        order = scores.argsort(dim=-1, descending=True)
        ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(length, device=order.device).expand_as(order))
    else:
        # the fast backend (exactly equal integers, tested): the reference popcount made the 8K report ~14 min
        ops = get_backend("auto", queries.device)
        dist = ops.hamming_distance(encoder.encode_query(queries.unsqueeze(0)), encoder.encode_key(keys.unsqueeze(0))[0])
        if share == "group":  # one selection per KV head, by each key's nearest query head
            dist = group_distance(dist, kv_heads)
    out = []
    n_eligible = eligible.sum(-1)  # [1, n]
    for fraction in fractions:
        k = budget_counts(n_eligible, fraction)
        if encoder is None:
            selected = ranks < k.unsqueeze(-1)
        else:
            selected = ops.select_smallest(dist, eligible.unsqueeze(0), k.unsqueeze(0), 0, encoder.bits)
            if share == "union":  # every head attends to what any head of its group selected
                selected = union_tiers(selected.to(torch.int8), kv_heads).bool()
            selected = expand_kv(selected, heads)[0]  # per group: the KV head's selection for each head
        out.append(float(mass_recall(probs, selected, eligible.expand(heads, -1, -1))))
    return out
