"""Tiered hashed attention behind the transformers attention-function contract.

:func:`tiered_step` is the method for one layer and one block of query tokens: encode the queries,
Hamming distances to the cached key codes, calibration, three tiers, attention over high and mid keys.
:func:`dashkv_attention_forward` is what transformers calls (registered as ``"dashkv"`` by
:func:`dashkv.enable`); it finds the layer's codes in the cache and falls back to exact SDPA for the
prefill of an empty cache and for modules DASH-KV is not attached to.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dashkv.calibration import (
    calibrate,
    consensus_mask,
    momentum_mask,
    update_prior,
    vote_threshold,
    whole_bits,
)
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders, LayerHashEncoder
from dashkv.ops.dispatch import get_backend
from dashkv.ops.reference import HIDDEN, HIGH, LOW, MidTierInputs, budget_counts, expand_kv, select_largest
from dashkv.stats import TierStats

logger = logging.getLogger(__name__)

ATTENTION_NAME = "dashkv"


def visibility(
    batch: int, queries: int, keys: int, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Which keys each query may see: Tensor[B, 1, T, S] bool.

    Queries are the last ``T`` positions of ``S`` (a block over a cached prefix). A 4-D mask from
    transformers (bool, ``True`` = attend; or additive float) is honoured as given, padding included.
    """
    if attention_mask is None:
        pos = torch.arange(keys, device=device)
        query_pos = keys - queries + torch.arange(queries, device=device)
        return (pos.view(1, -1) <= query_pos.view(-1, 1)).expand(batch, 1, queries, keys)
    mask = attention_mask[..., -keys:]
    mask = mask if mask.dtype == torch.bool else mask == 0
    return mask.expand(batch, 1, queries, keys)


def always_high(visible: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Sinks (first visible keys of each row) and the local window (the last ``window`` visible keys)."""
    keys = visible.shape[-1]
    pos = torch.arange(keys, device=visible.device)
    first = visible.int().argmax(-1, keepdim=True)
    last = keys - 1 - visible.flip(-1).int().argmax(-1, keepdim=True)
    return visible & ((pos < first + sinks) | (pos > last - window))


@dataclass
class StepResult:
    """Outputs of :func:`tiered_step`: ``output`` [B, H, T, D], ``probs`` [B, H, T, S] float32,
    ``tiers`` [B, H, T, S] int8."""

    output: torch.Tensor
    probs: torch.Tensor
    tiers: torch.Tensor


def tiered_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_codes: torch.Tensor,
    key_norms: torch.Tensor,
    encoder: LayerHashEncoder,
    config: DashKVConfig,
    visible: torch.Tensor,
    scaling: float,
    prior: torch.Tensor | None = None,
    ops: ModuleType | None = None,
) -> StepResult:
    """DASH-KV attention of one layer for a block of query tokens.

    Parameters
    ----------
    query : Tensor[B, H, T, D]
    key, value : Tensor[B, Hkv, S, D]
    key_codes : Tensor[B, Hkv, S, W], int64 ; key_norms : Tensor[B, Hkv, S], float32
    visible : Tensor[B, 1, T, S], bool
    prior : Tensor[B, T, S] float32 or None -- cross-layer attention prior of this step
    ops : kernel backend (default: ``config.backend``); one with ``dash_attention`` (the numba CPU
        backend) runs distances, calibration, tiers and attention as one fused kernel
    """
    ops = ops or get_backend(config.backend, query.device)
    if config.selector == "oracle":
        return oracle_step(query, key, value, config, visible, scaling, ops)
    bits = config.bits
    q32 = query.to(torch.float32)
    query_codes = encoder.encode_query(q32)

    always = always_high(visible, config.sinks, config.window)
    fused = getattr(ops, "dash_attention", None)
    if fused is not None:  # budgets as fractions: the fused kernel counts each row's eligible keys itself
        k_high, k_mid = float(config.high), float(config.mid)  # the config takes ints too (high=1)
    else:
        eligible = visible & ~always
        n_eligible = eligible.sum(-1)
        k_high = budget_counts(n_eligible, config.high)
        k_mid = budget_counts(n_eligible, config.high + config.mid) - k_high

    temporal = None
    if config.momentum and prior is not None and prior.shape[-1] == key.shape[-2]:
        temporal = momentum_mask(prior, visible, config.momentum_ratio)
    ds = config.spatial_discount if config.spatial_discount is not None else encoder.spatial_discount.item()
    dt = config.temporal_discount if config.temporal_discount is not None else encoder.temporal_discount.item()
    mid = None
    if config.mid > 0:
        center = expand_kv(encoder.key_center.unsqueeze(0), query.shape[1])  # [1, H, D]
        mid = MidTierInputs(
            dist=None,  # the raw distances, filled in below (the fused kernel computes its own)
            query_codes=query_codes,
            key_codes=key_codes,
            bits=bits,
            query_norm=q32.norm(dim=-1),
            key_norm=key_norms,
            query_dot_center=torch.einsum("bhtd,hd->bht", q32, center[0]),
            temperature=encoder.mid_temperature.detach(),
            bias=encoder.mid_bias.detach(),
            residual=encoder.residual.detach(),
        )
    if fused is not None:  # the same steps in one kernel, without [B, H, T, S] intermediates
        votes = vote_threshold(query.shape[1], config.vote_fraction) if config.consensus else 0
        output, probs, tiers = fused(
            query, key, value, query_codes, key_codes, k_high, k_mid, scaling, visible, always, mid,
            return_probs=True, return_tiers=True, bits=bits, min_votes=votes, spatial_step=whole_bits(ds),
            temporal=temporal, temporal_step=whole_bits(dt),
        )  # fmt: skip
        return StepResult(output, probs, tiers)

    raw = ops.hamming_distance(query_codes, key_codes)
    spatial = consensus_mask(raw, eligible, k_high, bits, config.vote_fraction, ops) if config.consensus else None
    dist, lo = calibrate(raw, spatial, temporal, ds, dt)
    tiers = ops.assign_tiers(dist, visible, always, k_high, k_mid, lo, bits)
    output, probs = ops.tiered_attention(query, key, value, tiers, scaling, mid and mid._replace(dist=raw))
    return StepResult(output, probs, tiers)


def oracle_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    config: DashKVConfig,
    visible: torch.Tensor,
    scaling: float,
    ops: ModuleType,
) -> StepResult:
    """Oracle top-k: the high tier is the ``config.high`` share of eligible keys with the largest exact
    ``q.k``, plus sinks and window; everything else is skipped. The ceiling of any key selector at that
    budget (it reads every key, so it saves nothing; evaluation only)."""
    always = always_high(visible, config.sinks, config.window)
    eligible = visible & ~always
    k_high = budget_counts(eligible.sum(-1), config.high)
    exact = query.to(torch.float32) @ expand_kv(key, query.shape[1]).to(torch.float32).transpose(-1, -2)
    high = select_largest(exact, eligible, k_high) | always
    tiers = torch.where(high, HIGH, torch.where(visible, LOW, HIDDEN)).to(torch.int8)
    output, probs = ops.tiered_attention(query, key, value, tiers, scaling, None)
    return StepResult(output, probs, tiers)


def dense_step(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor, scaling: float, ops: ModuleType
) -> StepResult:
    """Full attention through the same kernel (every visible key high), keeping the weights for momentum."""
    tiers = torch.where(visible, HIGH, HIDDEN).to(torch.int8).expand(-1, query.shape[1], -1, -1)
    output, probs = ops.tiered_attention(query, key, value, tiers, scaling, None)
    return StepResult(output, probs, tiers)


@dataclass
class DashKVRuntime:
    """State of one ``enable`` block: encoders, config, stats and the cache of the running forward."""

    encoders: HashEncoders
    config: DashKVConfig
    stats: TierStats = field(default_factory=TierStats)
    cache: object | None = None
    prior: torch.Tensor | None = None
    _warned: bool = False

    def begin_forward(self, cache: object | None) -> None:
        self.cache, self.prior = cache, None

    def _codes(self, layer_idx: int, key: torch.Tensor, encoder: LayerHashEncoder) -> tuple[torch.Tensor, torch.Tensor]:
        layers = getattr(self.cache, "layers", None)
        if layers is not None and layer_idx < len(layers):
            layer = layers[layer_idx]
            if getattr(layer, "keys", None) is key and getattr(layer, "codes", None) is not None:
                return layer.codes, layer.key_norms
        if not self._warned:
            logger.warning("no DASH-KV cache for this forward: key codes are computed on the fly (slower)")
            self._warned = True
        return encoder.encode_key(key)

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        """Attention of one layer; returns Tensor[B, T, H, D] as transformers expects."""
        if torch.isnan(query).any():
            raise ValueError(
                f"query of layer {layer_idx} contains NaN: hash codes of NaN are meaningless; "
                "check the model's inputs and dtype"
            )
        cfg = self.config
        batch, heads, queries, _ = query.shape
        keys = key.shape[-2]
        dense_layer = layer_idx in cfg.dense_layers
        # exact SDPA unless the weights are needed: the dense prefill, and dense layers without momentum
        if (keys == queries and cfg.prefill == "dense") or (dense_layer and not cfg.momentum):
            self.stats.record_dense(layer_idx)
            return _sdpa(query, key, value, attention_mask, scaling)
        ops = get_backend(cfg.backend, query.device)
        visible = visibility(batch, queries, keys, attention_mask, query.device)
        if dense_layer:  # full attention through the tier kernel, keeping its weights for the momentum prior
            self.stats.record_dense(layer_idx)
            result = dense_step(query, key, value, visible, scaling, ops)
            self.prior = update_prior(self.prior, result.probs, cfg.momentum_decay)
            return result.output.transpose(1, 2)

        encoder = self.encoders.layers[layer_idx]
        codes, norms = self._codes(layer_idx, key, encoder)
        outputs, priors = [], []
        for start in range(0, queries, cfg.chunk_size):
            rows = slice(start, min(start + cfg.chunk_size, queries))
            prior = self.prior[:, rows] if self.prior is not None and self.prior.shape[1] == queries else None
            result = tiered_step(
                query[:, :, rows], key, value, codes, norms, encoder, cfg, visible[:, :, rows], scaling, prior, ops
            )
            self.stats.record(layer_idx, result.tiers)
            outputs.append(result.output)
            if cfg.momentum:
                priors.append(update_prior(prior, result.probs, cfg.momentum_decay))
        if cfg.momentum:
            self.prior = torch.cat(priors, dim=1)
        return torch.cat(outputs, dim=2).transpose(1, 2)


def _sdpa(query, key, value, attention_mask, scaling):
    groups = query.shape[1] // key.shape[1]
    module = _GroupsOnly(groups)
    output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)
    return output


class _GroupsOnly(nn.Module):
    """The two attributes ``sdpa_attention_forward`` reads from an attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


# attention module -> runtime of the enable block it belongs to (weak: a dropped model frees its entry)
ACTIVE: "weakref.WeakKeyDictionary[nn.Module, DashKVRuntime]" = weakref.WeakKeyDictionary()


def dashkv_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``"dashkv"`` attention function (transformers' AttentionInterface contract).

    Returns ``(output [B, T, H, D], None)``.
    """
    runtime = ACTIVE.get(module)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if runtime is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    return runtime.attend(module.layer_idx, query, key, value, attention_mask, scaling), None
