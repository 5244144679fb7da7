"""Reference implementation of every DASH-KV kernel: readable torch, fp32, vectorised over batch and
heads. Fast backends keep these signatures and are tested against them (integers exactly).

Shapes follow Hugging Face: queries ``[B, H, T, D]``, keys/values ``[B, Hkv, S, D]``; query head ``h``
reads KV head ``h // (H // Hkv)``. Tier codes: ``2`` high (exact), ``1`` mid (estimated), ``0`` low
(skipped, kept in the cache), ``-1`` not visible (future or padding).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from dashkv.calibration import calibrate, momentum_mask, update_prior
from dashkv.codes import to_signs, unpack_bits

HIGH, MID, LOW, HIDDEN = 2, 1, 0, -1

_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F


def popcount64(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each int64 word (torch has no popcount op): SWAR bit counting.

    Parameters
    ----------
    words : Tensor[...], int64

    Returns
    -------
    Tensor[...], int64 in ``[0, 64]``
    """
    x = words - ((words >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


def expand_kv(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat KV heads ``[B, Hkv, ...]`` to query heads ``[B, H, ...]`` (GQA)."""
    groups = num_heads // tensor.shape[1]
    return tensor if groups == 1 else tensor.repeat_interleave(groups, dim=1)


def encode_query(encoder, query: torch.Tensor) -> torch.Tensor:
    """Packed query codes ``[B, H, T, W]`` int64 of ``query [B, H, T, D]`` (the encoder's own torch code)."""
    return encoder.encode_query(query)


def encode_key(encoder, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed key codes ``[B, Hkv, S, W]`` int64 and centred norms ``[B, Hkv, S]`` of ``key``."""
    return encoder.encode_key(key)


def hamming_distance(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    """Packed Hamming distance between every query code and every key code of its KV head.

    Parameters
    ----------
    query_codes : Tensor[B, H, T, W], int64
    key_codes : Tensor[B, Hkv, S, W], int64

    Returns
    -------
    Tensor[B, H, T, S], int32 in ``[0, 64 * W]``
    """
    keys = expand_kv(key_codes, query_codes.shape[1])
    xor = query_codes.unsqueeze(3) ^ keys.unsqueeze(2)  # [B, H, T, S, W]
    return popcount64(xor).sum(-1).to(torch.int32)


def block_distance(query_codes: torch.Tensor, key_codes: torch.Tensor, block: int) -> torch.Tensor:
    """Smallest Hamming distance from each key to the queries of a block of ``block`` consecutive
    tokens, over the query heads of the key's GQA group: how near the key comes to any of them (the
    block prefill's selection score, :mod:`dashkv.block_prefill`).

    Parameters
    ----------
    query_codes : Tensor[B, H, T, W], int64
    key_codes : Tensor[B, Hkv, S, W], int64
    block : int >= 1

    Returns
    -------
    Tensor[B, Hkv, ceil(T / block), S], int32
    """
    batch, heads, tokens, _ = query_codes.shape
    kv_heads, seq = key_codes.shape[1], key_codes.shape[2]
    out = []
    for start in range(0, tokens, block):
        dist = hamming_distance(query_codes[:, :, start : start + block], key_codes)  # [B, H, Tb, S]
        out.append(dist.view(batch, kv_heads, -1, seq).amin(2))  # a group's heads are consecutive
    return torch.stack(out, 2) if out else torch.empty(batch, kv_heads, 0, seq, dtype=torch.int32)


def budget_counts(num_eligible: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keys a fraction buys: ``ceil(fraction * n)`` per row, never more than ``n``."""
    k = torch.ceil(num_eligible.to(torch.float64) * fraction - 1e-9).clamp_(min=0)
    return torch.minimum(k.to(torch.int64), num_eligible.to(torch.int64))


def histogram(dist: torch.Tensor, eligible: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Count eligible keys per integer distance value.

    Parameters
    ----------
    dist : Tensor[B, H, T, S], integer in ``[lo, hi]``
    eligible : Tensor[B, H or 1, T, S], bool

    Returns
    -------
    Tensor[B, H, T, hi - lo + 1], int64
    """
    idx = (dist.to(torch.int64) - lo).clamp_(0, hi - lo)
    weights = eligible.expand_as(dist).to(torch.int64)
    counts = torch.zeros(*dist.shape[:-1], hi - lo + 1, dtype=torch.int64, device=dist.device)
    return counts.scatter_add_(-1, idx, weights)


def kth_smallest(dist: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The k-th smallest eligible distance of each row, from a histogram (no sort).

    Parameters
    ----------
    dist : Tensor[B, H, T, S], integer in ``[lo, hi]``
    eligible : Tensor[B, H or 1, T, S], bool
    k : Tensor[B, H or 1, T], int64, ``k >= 0``

    Returns
    -------
    Tensor[B, H, T], int64: ``sorted(eligible distances)[k - 1]`` for ``1 <= k <= n``; ``lo`` for
    ``k == 0`` and ``hi + 1`` for ``k > n`` (so the selection rule below stays uniform).
    """
    cum = histogram(dist, eligible, lo, hi).cumsum(-1)
    return lo + (cum < k.expand(cum.shape[:-1]).unsqueeze(-1)).sum(-1)


def select_smallest(dist: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Exactly ``min(k, n)`` eligible keys of smallest distance per row; ties go to later positions.

    The order (distance up, position down) is total, so selections for growing ``k`` are nested.

    Parameters
    ----------
    dist : Tensor[B, H, T, S], integer in ``[lo, hi]``
    eligible : Tensor[B, H or 1, T, S], bool
    k : Tensor[B, H or 1, T], int64

    Returns
    -------
    Tensor[B, H, T, S], bool
    """
    eligible = eligible.expand_as(dist)
    threshold = kth_smallest(dist, eligible, k, lo, hi).unsqueeze(-1)
    below = eligible & (dist < threshold)
    need = k.expand(threshold.shape[:-1]).unsqueeze(-1) - below.sum(-1, keepdim=True)
    tie = eligible & (dist == threshold)
    rank_from_end = tie.flip(-1).cumsum(-1).flip(-1)
    return below | (tie & (rank_from_end <= need))


def assign_tiers(
    dist: torch.Tensor,
    visible: torch.Tensor,
    always: torch.Tensor,
    k_high: torch.Tensor,
    k_mid: torch.Tensor,
    lo: int,
    hi: int,
) -> torch.Tensor:
    """Three tiers from calibrated distances.

    Parameters
    ----------
    dist : Tensor[B, H, T, S], integer in ``[lo, hi]``
    visible : Tensor[B, 1, T, S], bool -- causal and padding mask
    always : Tensor[B, 1, T, S], bool -- sinks and local window, always high
    k_high, k_mid : Tensor[B, 1, T], int64 -- keys to put in high and in mid, outside ``always``

    Returns
    -------
    Tensor[B, H, T, S], int8 -- ``2`` high, ``1`` mid, ``0`` low, ``-1`` not visible
    """
    eligible = visible & ~always
    high = select_smallest(dist, eligible, k_high, lo, hi) | (always & visible)
    high_or_mid = select_smallest(dist, eligible, k_high + k_mid, lo, hi)
    tiers = torch.full(dist.shape, HIDDEN, dtype=torch.int8, device=dist.device)
    tiers.masked_fill_(visible.expand_as(dist), LOW)
    tiers.masked_fill_(high_or_mid, MID)
    tiers.masked_fill_(high, HIGH)
    return tiers


class MidTierInputs(NamedTuple):
    """What the mid-tier estimate needs besides q, K and V (see :func:`mid_tier_logits`).

    Attributes
    ----------
    dist : Tensor[B, H, T, S], int32 -- raw Hamming distance
    query_codes : Tensor[B, H, T, W], int64 -- packed query codes
    key_codes : Tensor[B, Hkv, S, W], int64 -- packed key codes
    bits : int -- ``R``
    query_norm : Tensor[B, H, T], float32 -- ``|q|``
    key_norm : Tensor[B, Hkv, S], float32 -- ``|k - mu|``
    query_dot_center : Tensor[B, H, T], float32 -- ``q . mu`` (``mu`` the key centre of q's KV head)
    temperature, bias : Tensor[H], float32
    residual : Tensor[H, R], float32 -- bit weights ``phi``
    """

    dist: torch.Tensor
    query_codes: torch.Tensor
    key_codes: torch.Tensor
    bits: int
    query_norm: torch.Tensor
    key_norm: torch.Tensor
    query_dot_center: torch.Tensor
    temperature: torch.Tensor
    bias: torch.Tensor
    residual: torch.Tensor


def mid_tier_logits(mid: MidTierInputs, scaling: float) -> torch.Tensor:
    """Estimated logits of every key from its code (the reference computes them densely).

    ``q.k = q.mu + q.(k - mu)``; the second term is estimated from the hash dot product through the
    random-hyperplane angle estimate ``|q| |k - mu| cos(pi * D / R)``, sharpened by a per-head
    temperature (the paper's asymmetric temperature against over-smoothed hash scores), shifted by a
    per-head bias, plus the residual ``sum_r phi_r h_q,r h_k,r`` (a learned bit-weighted agreement,
    ``h = +-1``).

    Returns
    -------
    Tensor[B, H, T, S], float32
    """
    heads = mid.dist.shape[1]
    cos = torch.cos(math.pi * mid.dist.to(torch.float32) / mid.bits)
    knorm = expand_kv(mid.key_norm, heads).unsqueeze(2)
    estimate = mid.temperature.view(1, -1, 1, 1) * mid.query_norm.unsqueeze(-1) * knorm * cos
    logits = (mid.query_dot_center.unsqueeze(-1) + estimate) * scaling + mid.bias.view(1, -1, 1, 1)
    query_signs = to_signs(unpack_bits(mid.query_codes, mid.bits))
    key_signs = to_signs(unpack_bits(expand_kv(mid.key_codes, heads), mid.bits))
    weighted_q = query_signs * mid.residual.view(1, heads, 1, -1)
    return logits + weighted_q @ key_signs.transpose(-1, -2)


def anchor_offset(exact: torch.Tensor, estimate: torch.Tensor, tiers: torch.Tensor) -> torch.Tensor:
    """Per-row shift that makes the estimate agree, on average, with the exact logits of the high tier.

    The code-based estimate is biased upward for keys chosen by their codes (they won the ranking,
    partly by luck), and the bias moves with the query; the high tier, scored both ways, measures it
    for free. Rows without high keys get no shift.

    Returns
    -------
    Tensor[B, H, T, 1], float32
    """
    high = tiers == HIGH
    gap = torch.where(high, exact - estimate, torch.zeros_like(exact)).sum(-1, keepdim=True)
    return gap / high.sum(-1, keepdim=True).clamp(min=1)


def tiered_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    tiers: torch.Tensor,
    scaling: float,
    mid: MidTierInputs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over high (exact ``q.k * scaling``) and mid (estimated) keys; low keys get zero weight.

    Parameters
    ----------
    query : Tensor[B, H, T, D]
    key, value : Tensor[B, Hkv, S, D]
    tiers : Tensor[B, H, T, S], int8
    scaling : float -- the model's ``1 / sqrt(D)``
    mid : MidTierInputs or None -- needed when any key is in the mid tier

    Returns
    -------
    output : Tensor[B, H, T, D], query's dtype
    probs : Tensor[B, H, T, S], float32 -- the attention weights (zero outside high and mid)
    """
    heads = query.shape[1]
    k = expand_kv(key, heads).to(torch.float32)
    v = expand_kv(value, heads).to(torch.float32)
    exact = (query.to(torch.float32) @ k.transpose(-1, -2)) * scaling
    logits = torch.where(tiers == HIGH, exact, torch.full_like(exact, float("-inf")))
    if mid is not None:
        estimate = mid_tier_logits(mid, scaling)
        logits = torch.where(tiers == MID, estimate + anchor_offset(exact, estimate, tiers), logits)
    probs = torch.softmax(logits, dim=-1)
    return (probs @ v).to(query.dtype), probs


DENSE_DECODE = False  # dense_attention is the tiered one with every key high: SDPA is faster


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    want_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full attention over the visible keys: :func:`tiered_attention` with every visible key high (a
    layer left to full attention; its weights feed the momentum prior where a later layer reads it).

    Parameters
    ----------
    query : Tensor[B, H, T, D]
    key, value : Tensor[B, Hkv, S, D]
    visible : Tensor[B, 1 or H, T, S], bool
    scaling : float
    want_probs : bool -- return the weights too

    Returns
    -------
    output : Tensor[B, H, T, D], query's dtype
    probs : Tensor[B, H, T, S], float32, or None unless ``want_probs``
    """
    tiers = torch.where(visible, HIGH, HIDDEN).to(torch.int8).expand(-1, query.shape[1], -1, -1)
    output, probs = tiered_attention(query, key, value, tiers, scaling)
    return output, probs if want_probs else None


def select_largest(scores: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Exactly ``min(k, n)`` eligible keys of largest score per row (the oracle selector's top-k).

    Parameters
    ----------
    scores : Tensor[B, H, T, S], float
    eligible : Tensor[B, H or 1, T, S], bool
    k : Tensor[B, H or 1, T], int64

    Returns
    -------
    Tensor[B, H, T, S], bool
    """
    eligible = eligible.expand_as(scores)
    masked = torch.where(eligible, scores.to(torch.float32), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    order = masked.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return eligible & (ranks < k.expand(scores.shape[:-1]).unsqueeze(-1))


# ------------------------------------------------------------------------- the whole decode step


class StepInputs(NamedTuple):
    """Tensors of one layer's step (see :func:`decode_step`).

    Attributes
    ----------
    query : Tensor[B, H, T, D]
    key, value : Tensor[B, Hkv, S, D]
    query_codes : Tensor[B, H, T, W], int64; or None for :func:`layer_step` (the plan's encoder makes them)
    key_codes : Tensor[B, Hkv, S, W], int64
    key_norms : Tensor[B, Hkv, S], float32 -- ``|k - mu|``
    visible : Tensor[B, 1, T, S], bool -- causal and padding mask
    always : Tensor[B, 1, T, S], bool -- sinks and local window (always high)
    prior : Tensor[B, T, S] float32 or None -- cross-layer attention prior of this step
    coded : int or None -- for :func:`layer_step`: keys from this position on have no codes and norms
        yet; the step computes them with the plan's encoder and writes them into ``key_codes`` and
        ``key_norms`` (a cache's buffers). None: every key has its code.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    query_codes: torch.Tensor
    key_codes: torch.Tensor
    key_norms: torch.Tensor
    visible: torch.Tensor
    always: torch.Tensor
    prior: torch.Tensor | None
    coded: int | None = None


class StepSettings(NamedTuple):
    """Numbers of one layer's step, from the config and the layer's encoder.

    Attributes
    ----------
    high, mid : float -- shares of each row's eligible keys (outside ``always``) for the two tiers
    bits : int -- code length ``R``
    share : str -- ``"head"``: tiers per query head; ``"group"``: once per KV head, by each key's raw
        distance to the nearest of the group's query heads (:func:`group_distance`)
    min_votes : int -- consensus: selections (query heads, or groups) a key needs; 0 turns it off
    spatial_step, temporal_step : int -- discounts in whole bits of a distance (``<= 0``)
    momentum_ratio : float -- momentum marks keys whose prior is at least this many times uniform
    momentum_decay : float -- weight of the old prior in the updated one
    scaling : float -- the model's ``1 / sqrt(D)``
    want_prior : bool -- return the updated prior (the next layer's momentum input)
    want_weights : bool -- return the ``[B, H, T, S]`` weights and tiers
    """

    high: float
    mid: float
    bits: int
    share: str
    min_votes: int
    spatial_step: int
    temporal_step: int
    momentum_ratio: float
    momentum_decay: float
    scaling: float
    want_prior: bool
    want_weights: bool


class MidTierWeights(NamedTuple):
    """The encoder's mid-tier parameters: ``key_center [Hkv, D]``, ``temperature`` and ``bias [H]``,
    ``residual [H, R]`` (float32)."""

    key_center: torch.Tensor
    temperature: torch.Tensor
    bias: torch.Tensor
    residual: torch.Tensor


class StepOutputs(NamedTuple):
    """Results of :func:`decode_step`.

    Attributes
    ----------
    output : Tensor[B, H, T, D], query's dtype
    counts : Tensor[3], int64 -- (query head, token, key) triples in the high, mid and low tiers
    prior : Tensor[B, T, S] float32 or None -- ``decay * prior + (1 - decay) * mean_h(weights)``
    probs : Tensor[B, H, T, S] float32 or None ; tiers : Tensor[B, H, T, S] int8 or None
    """

    output: torch.Tensor
    counts: torch.Tensor
    prior: torch.Tensor | None
    probs: torch.Tensor | None
    tiers: torch.Tensor | None


def group_distance(raw: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Each key's raw distance to the nearest query head of its GQA group: ``[B, H, T, S] -> [B, Hkv,
    T, S]``. The nearest, not the sum: a key that one head needs stays near however far the group's
    other heads are (a sum let them outvote a retrieval head; measured in docs/method.md)."""
    b, h, t, s = raw.shape
    return raw.view(b, kv_heads, h // kv_heads, t, s).amin(2)


def union_tiers(tiers: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Per-head tiers ``[B, H, T, S]`` joined over each GQA group: a key high for any of the group's heads
    is high for all of them, else mid if mid for any (``share="union"``)."""
    b, h, t, s = tiers.shape
    joined = tiers.view(b, kv_heads, h // kv_heads, t, s).amax(2, keepdim=True)
    return joined.expand(b, kv_heads, h // kv_heads, t, s).reshape(b, h, t, s)


def decode_step(inputs: StepInputs, settings: StepSettings, mid: MidTierWeights | None) -> StepOutputs:
    """DASH-KV attention of one layer: distances, consensus, momentum, calibration, tiers, attention.

    The readable specification of every backend's ``decode_step``. ``mid`` None (or ``settings.mid
    == 0``) runs without the mid tier.
    """
    q, k, v = inputs.query, inputs.key, inputs.value
    heads, kv_heads = q.shape[1], k.shape[1]
    visible, always = inputs.visible, inputs.always
    eligible = visible & ~always
    n_eligible = eligible.sum(-1)
    k_high = budget_counts(n_eligible, settings.high)
    k_mid = budget_counts(n_eligible, settings.high + settings.mid) - k_high
    raw = hamming_distance(inputs.query_codes, inputs.key_codes)
    dist = group_distance(raw, kv_heads) if settings.share == "group" else raw
    hi = settings.bits
    spatial = temporal = None
    if settings.min_votes > 0 and settings.spatial_step != 0:
        votes = select_smallest(dist, eligible, k_high, 0, hi).sum(1, keepdim=True)
        spatial = votes >= settings.min_votes
    if inputs.prior is not None and settings.temporal_step != 0:
        temporal = momentum_mask(inputs.prior, visible, settings.momentum_ratio)
    dist, lo = calibrate(dist, spatial, temporal, settings.spatial_step, settings.temporal_step)
    tiers = expand_kv(assign_tiers(dist, visible, always, k_high, k_mid, lo, hi), heads)
    if settings.share == "union":
        tiers = union_tiers(tiers, kv_heads)
    return attend_over_tiers(inputs, settings, mid, raw, tiers)


def attend_over_tiers(inputs: StepInputs, settings: StepSettings, mid: MidTierWeights | None, raw: torch.Tensor,
                      tiers: torch.Tensor, attention=tiered_attention) -> StepOutputs:  # fmt: skip
    """The rest of :func:`decode_step` once the tiers ``[B, H, T, S]`` are chosen: the mid-tier estimate
    from the raw distances ``raw [B, H, T, S]``, the tiered attention (``attention``: a backend's
    ``tiered_attention``), the tier counts, the next layer's prior and the weights."""
    q = inputs.query
    estimate = None
    if mid is not None and settings.mid > 0:
        q32 = q.to(torch.float32)
        center = expand_kv(mid.key_center.to(q32.device).unsqueeze(0), q.shape[1])[0]
        estimate = MidTierInputs(
            raw, inputs.query_codes, inputs.key_codes, settings.bits, q32.norm(dim=-1), inputs.key_norms,
            torch.einsum("bhtd,hd->bht", q32, center), mid.temperature, mid.bias, mid.residual,
        )  # fmt: skip
    output, probs = attention(q, inputs.key, inputs.value, tiers, settings.scaling, estimate)
    counts = torch.stack([(tiers == t).sum() for t in (HIGH, MID, LOW)]).to(torch.int64)
    prior = update_prior(inputs.prior, probs, settings.momentum_decay) if settings.want_prior else None
    weights = (probs, tiers) if settings.want_weights else (None, None)
    return StepOutputs(output, counts, prior, *weights)


class LayerPlan(NamedTuple):
    """What a layer's step needs besides the tensors of the call: its encoder (a
    :class:`~dashkv.encoders.LayerHashEncoder`), settings and mid-tier weights, and what the backend
    prepared from them (``prepared``; the reference prepares nothing). Made by a backend's
    ``plan_layer`` once per layer and ``enable`` block, so that each step converts only its own tensors
    (the plan / run split)."""

    encoder: object
    settings: StepSettings
    mid: MidTierWeights | None
    prepared: object = None


def plan_layer(encoder, settings: StepSettings, mid: MidTierWeights | None) -> LayerPlan:
    """The plan of one layer (see :class:`LayerPlan`)."""
    return LayerPlan(encoder, settings, mid)


def code_new_keys(encoder, inputs: StepInputs, encode=encode_key) -> None:
    """Write the codes and norms of the keys from ``inputs.coded`` on into ``inputs.key_codes`` and
    ``inputs.key_norms`` (see :class:`StepInputs`), by ``encode`` (a backend's ``encode_key``)."""
    if inputs.coded is not None and inputs.coded < inputs.key.shape[2]:
        codes, norms = encode(encoder, inputs.key[:, :, inputs.coded :])
        inputs.key_codes[:, :, inputs.coded :] = codes
        inputs.key_norms[:, :, inputs.coded :] = norms


def layer_step(plan: LayerPlan, inputs: StepInputs) -> StepOutputs:
    """One layer's step from its plan: the codes of keys not coded yet and of the queries (where
    ``inputs.query_codes`` is None), by the plan's encoder, then :func:`decode_step`."""
    code_new_keys(plan.encoder, inputs)
    if inputs.query_codes is None:
        inputs = inputs._replace(query_codes=encode_query(plan.encoder, inputs.query))
    return decode_step(inputs, plan.settings, plan.mid)
