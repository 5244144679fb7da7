"""Tiered hashed attention behind the transformers attention-function contract.

:func:`tiered_step` is the method for one layer and one block of query tokens: encode the queries,
Hamming distances to the cached key codes, calibration, three tiers, attention over high and mid keys.
:func:`dashkv_attention_forward` is what transformers calls (registered as ``"dashkv"`` by
:func:`dashkv.enable`); it finds the layer's codes in the cache and falls back to exact SDPA for the
prefill of an empty cache and for modules DASH-KV is not attached to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from types import ModuleType

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dashkv.block_prefill import block_prefill_attention
from dashkv.calibration import update_prior, vote_threshold, whole_bits
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders, LayerHashEncoder
from dashkv.ops.dispatch import get_backend
from dashkv.ops.reference import (
    HIDDEN,
    HIGH,
    LOW,
    LayerPlan,
    MidTierWeights,
    StepInputs,
    StepSettings,
    budget_counts,
    expand_kv,
    select_largest,
)
from dashkv.stats import TierStats

logger = logging.getLogger(__name__)

ATTENTION_NAME = "dashkv"
DENSE_KERNEL_QUERIES = 4  # query tokens up to which exact attention takes a backend's dense kernel
_PLANS_KEPT = 4  # plans an encoder keeps (backend, config, scaling): each holds a copy of its weights


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
    """Outputs of :func:`tiered_step`: ``output`` [B, H, T, D]; ``counts`` [3] int64 (high, mid, low
    triples); ``prior`` [B, T, S] float32, the next layer's momentum prior, when asked for; ``probs``
    [B, H, T, S] float32 and ``tiers`` [B, H, T, S] int8 when the weights were asked for."""

    output: torch.Tensor
    probs: torch.Tensor | None
    tiers: torch.Tensor | None
    prior: torch.Tensor | None = None
    counts: torch.Tensor | None = None


def step_settings(
    config: DashKVConfig, encoder: LayerHashEncoder, heads: int, kv_heads: int, scaling: float,
    want_prior: bool, want_weights: bool,
) -> StepSettings:  # fmt: skip
    """The numbers of one layer's step: the config's, with the encoder's learned discounts (whole bits)."""
    ds = config.spatial_discount if config.spatial_discount is not None else float(encoder.spatial_discount.detach())
    share = config.share or "head"  # None outside ``enable`` (which fills in the encoders' choice): per head
    voters = kv_heads if share == "group" else heads
    return StepSettings(
        high=float(config.high), mid=float(config.mid), bits=config.bits, share=share,
        min_votes=vote_threshold(voters, config.vote_fraction) if config.consensus else 0,
        spatial_step=whole_bits(ds), temporal_step=temporal_bits(config, encoder),
        momentum_ratio=config.momentum_ratio, momentum_decay=config.momentum_decay, scaling=scaling,
        want_prior=want_prior, want_weights=want_weights,
    )  # fmt: skip


def temporal_bits(config: DashKVConfig, encoder: LayerHashEncoder) -> int:
    """The momentum discount of a layer's step in whole bits: the config's, else the encoder's learned
    one; 0 without momentum."""
    if not config.momentum:
        return 0
    dt = config.temporal_discount if config.temporal_discount is not None else float(encoder.temporal_discount.detach())
    return whole_bits(dt)


def mid_weights(encoder: LayerHashEncoder) -> MidTierWeights:
    return MidTierWeights(
        encoder.key_center.detach(), encoder.mid_temperature.detach(), encoder.mid_bias.detach(),
        encoder.residual.detach(),
    )  # fmt: skip


def layer_plan(
    ops: ModuleType, encoder: LayerHashEncoder, config: DashKVConfig, heads: int, kv_heads: int, scaling: float,
    *, want_prior: bool, want_weights: bool,
) -> LayerPlan:  # fmt: skip
    """The backend's plan of one layer's step (``ops.plan_layer``): what :func:`tiered_step` needs besides
    the tensors of a call, prepared once."""
    settings = step_settings(config, encoder, heads, kv_heads, scaling, want_prior, want_weights)
    return ops.plan_layer(encoder, settings, mid_weights(encoder) if config.mid > 0 else None)


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
    *,
    always: torch.Tensor | None = None,
    want_prior: bool = False,
    want_weights: bool = True,
    plan: LayerPlan | None = None,
    coded: int | None = None,
) -> StepResult:
    """DASH-KV attention of one layer for a block of query tokens: the backend's ``layer_step``.

    Parameters
    ----------
    query : Tensor[B, H, T, D]
    key, value : Tensor[B, Hkv, S, D]
    key_codes : Tensor[B, Hkv, S, W], int64 ; key_norms : Tensor[B, Hkv, S], float32
    visible : Tensor[B, 1, T, S], bool
    prior : Tensor[B, T, S] float32 or None -- cross-layer attention prior of this step
    ops : kernel backend (default: ``config.backend``), any module with the contract of
        :class:`dashkv.ops.dispatch.Backend`
    always : Tensor[B, 1, T, S] bool or None -- sinks and window (computed from ``visible`` if None)
    want_prior, want_weights : return the updated prior / the ``[B, H, T, S]`` weights and tiers
    plan : the layer's plan (:func:`layer_plan` of the same backend, encoder, config and flags), made
        here when None; the decode path passes the one it keeps
    coded : int or None -- keys from this position on have no codes yet: the step writes them into
        ``key_codes`` / ``key_norms`` (a cache's buffers, :meth:`dashkv.cache.DashKVLayer.code_views`)
    """
    ops = ops or get_backend(config.backend, query.device)
    if config.selector == "oracle":
        return oracle_step(query, key, value, config, visible, scaling, ops)
    if always is None:
        always = always_high(visible, config.sinks, config.window)
    if prior is not None and prior.shape[-1] != key.shape[-2]:
        prior = None
    if plan is None:
        plan = layer_plan(ops, encoder, config, query.shape[1], key.shape[1], scaling, want_prior=want_prior,
                          want_weights=want_weights)  # fmt: skip
    inputs = StepInputs(query, key, value, None, key_codes, key_norms, visible, always,
                        prior if config.momentum else None, coded)  # fmt: skip
    out = ops.layer_step(plan, inputs)
    return StepResult(out.output, out.probs, out.tiers, out.prior, out.counts)


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
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor, scaling: float,
    ops: ModuleType, want_probs: bool,
) -> StepResult:  # fmt: skip
    """Full attention of a dense layer through the backend, with the weights where the momentum prior
    needs them (``want_probs``); no tiers."""
    output, probs = ops.dense_attention(query, key, value, visible, scaling, want_probs)
    return StepResult(output, probs, None)


@dataclass
class DashKVRuntime:
    """State of one ``enable`` block: encoders, config, stats and the cache of the running forward."""

    encoders: HashEncoders
    config: DashKVConfig
    stats: TierStats = field(default_factory=TierStats)
    cache: object | None = None
    prior: torch.Tensor | None = None
    _warned: bool = False

    _masks: dict = field(default_factory=dict)
    # the model's sliding-window layers: transformers' SDPA runs them, untouched (DASH-KV keeps every key)
    sliding: frozenset[int] = frozenset()
    _plans: dict = field(default_factory=dict)  # layer -> its LayerPlan, checked in this forward
    _ops: tuple | None = None  # (device, backend) of the last call

    def __post_init__(self) -> None:
        self._encoders = list(self.encoders.layers)  # indexing a ModuleList costs more than a list
        self._prior_for: frozenset[int] | None = None
        self._layer_configs: dict[tuple[int, float], DashKVConfig] = {}  # (layer, scale) -> its config

    def layer_config(self, layer_idx: int) -> DashKVConfig:
        """The config a tiered layer runs: ``high`` times the encoders' budget scale of the layer (at most
        ``1 - mid``; a config with every key high stays so), everything else as given."""
        scale = self.encoders.budget_scale(layer_idx)
        held = self._layer_configs.get((layer_idx, scale))
        if held is None:
            cfg = self.config
            keep = scale == 1.0 or cfg.high >= 1.0
            held = cfg if keep else replace(cfg, high=min(1.0 - cfg.mid, cfg.high * scale))
            self._layer_configs[layer_idx, scale] = held
        return held

    def prior_layers(self) -> frozenset[int]:
        """Layers whose step must produce the momentum prior: those before a later tiered layer that reads
        it (a temporal discount of at least one whole bit). Encoders whose discounts round to 0 bits
        (Gemma-3-270M's) read no prior: no step then builds the ``[B, T, S]`` weights for one."""
        if self._prior_for is None:
            cfg = self.config
            served = [i for i in range(len(self._encoders)) if i not in self.sliding]
            readers = [i for i in served if i not in cfg.dense_layers and temporal_bits(cfg, self._encoders[i]) != 0]
            last = max(readers) if cfg.momentum and readers else -1
            self._prior_for = frozenset(i for i in served if i < last)
        return self._prior_for

    def begin_forward(self, cache: object | None) -> None:
        self.cache, self.prior = cache, None
        self._masks.clear()
        self._plans.clear()

    def _plan(self, layer_idx: int, encoder: LayerHashEncoder, ops: ModuleType, heads: int, kv_heads: int,
              scaling: float) -> LayerPlan:  # fmt: skip
        """The layer's plan, kept on its encoder for this backend, config and scaling (later ``enable``
        blocks reuse it) and remade when the encoder's tensors changed: checked once per forward, so
        encoders trained between two forwards are never served stale."""
        plan = self._plans.get(layer_idx)
        if plan is not None:
            return plan
        stamp = encoder.state_stamp()
        kept = encoder.__dict__.setdefault("_dashkv_plans", {})
        want_prior = layer_idx in self.prior_layers()
        cfg = self.layer_config(layer_idx)
        key = (ops.__name__, cfg, scaling, want_prior)
        held = kept.get(key)
        if held is None or held[0] != stamp:
            if held is not None:  # the encoder was trained since: its discounts may read a prior now
                self._prior_for = None
            plan = layer_plan(ops, encoder, cfg, heads, kv_heads, scaling, want_prior=want_prior,
                              want_weights=cfg.selector == "oracle")  # fmt: skip
            kept.pop(key, None)
            while len(kept) >= _PLANS_KEPT:  # a sweep over many configs keeps the latest few
                kept.pop(next(iter(kept)))
            held = kept[key] = (stamp, plan)
        self._plans[layer_idx] = held[1]
        return held[1]

    def _mask(self, batch: int, queries: int, keys: int, attention_mask, device,
              always: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """``visible`` and (if ``always``) ``always`` of this forward, built once and shared by its layers
        (they see the same mask; dense and sliding layers of other models would pass another mask
        object). The block prefill needs no ``always``: 0.3 s a chunk at 32K keys, not built for it."""
        key = (batch, queries, keys, None if attention_mask is None else id(attention_mask))
        held = self._masks.get(key)
        if held is None or (attention_mask is not None and held[0] is not attention_mask):
            held = self._masks[key] = [attention_mask, visibility(batch, queries, keys, attention_mask, device), None]
        if always and held[2] is None:
            held[2] = always_high(held[1], self.config.sinks, self.config.window)
        return held[1], held[2]

    def _cache_layer(self, layer_idx: int, key: torch.Tensor, coding: bool = False):
        """The running cache's layer holding ``key`` when it keeps key codes (else None); ``coding``: code
        its keys now (:meth:`dashkv.cache.DashKVLayer.code_views`)."""
        layers = getattr(self.cache, "layers", None)
        if layers is None or layer_idx >= len(layers):
            return None
        layer = layers[layer_idx]
        if getattr(layer, "keys", None) is not key or getattr(layer, "encoder", None) is None:
            return None
        if coding:
            layer.code_views(pending=0)
        return layer

    def _codes(self, layer_idx: int, key: torch.Tensor, encoder: LayerHashEncoder):
        """``(codes, norms, coded, cache layer)`` of the layer's keys: the cache's buffers, whose keys from
        ``coded`` on the step codes, or codes made on the fly (no cache; ``coded`` and layer None)."""
        layer = self._cache_layer(layer_idx, key)
        if layer is not None:
            return (*layer.code_views(), layer)
        if not self._warned:
            logger.warning("no DASH-KV cache for this forward: key codes are computed on the fly (slower)")
            self._warned = True
        return (*encoder.encode_key(key), None, None)

    def _backend(self, device: torch.device) -> ModuleType:
        held = self._ops
        if held is None or held[0] != device:
            held = self._ops = (device, get_backend(self.config.backend, device))
        return held[1]

    def _block_prefill(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       visible: torch.Tensor, scaling: float) -> torch.Tensor:  # fmt: skip
        """A prefill chunk through :func:`dashkv.block_prefill.block_prefill_attention`; the momentum prior
        is not kept (the next decode step starts its own)."""
        cfg = self.layer_config(layer_idx)
        encoder = self._encoders[layer_idx]
        layer = self._cache_layer(layer_idx, key)
        codes = layer.codes if layer is not None else encoder.encode_key(key)[0]  # every key coded
        output, counts = block_prefill_attention(
            query, key, value, codes, encoder, visible, scaling, self._backend(query.device),
            share=cfg.high + cfg.mid, sinks=cfg.sinks, window=cfg.window, block=cfg.prefill_block,
        )  # fmt: skip
        self.stats.record_counts(layer_idx, counts)
        self.prior = None
        return output.transpose(1, 2)

    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        """Attention of one layer (``module``, the model's attention module); returns Tensor[B, T, H, D]
        as transformers expects."""
        layer_idx = module.layer_idx
        if torch.isnan(query).any():
            raise ValueError(
                f"query of layer {layer_idx} contains NaN: hash codes of NaN are meaningless; "
                "check the model's inputs and dtype"
            )
        cfg = self.config
        batch, heads, queries, _ = query.shape
        keys = key.shape[-2]
        dense_layer = layer_idx in cfg.dense_layers
        blocks = cfg.prefill == "blocks" and queries > 1  # a prefill chunk, in blocks of shared keys
        # exact attention unless the weights are needed: the dense prefill, short caches (where it is
        # the faster of the two) and dense layers whose weights no later layer reads (a block prefill
        # keeps no momentum); decode steps take the dense kernel, which reads a GQA group's K and V rows
        # once (transformers' SDPA copies them per query head: 3x slower at 32K), prefills SDPA
        unread = queries > 1 and layer_idx not in self.prior_layers()
        ops = self._backend(query.device)
        if ((keys == queries and cfg.prefill == "dense") or keys < cfg.dense_below
                or (dense_layer and (blocks or not cfg.momentum or unread))):  # fmt: skip
            self.stats.record_dense(layer_idx)
            if keys >= cfg.dense_below and not dense_layer:  # the next steps hash these keys: code them now,
                self._cache_layer(layer_idx, key, coding=True)  # in one batch, not in the first tiered step
            if queries <= DENSE_KERNEL_QUERIES and ops.DENSE_DECODE and not torch.is_grad_enabled():
                # a decode step below dense_below: a backend's dense kernel that beats SDPA there (the
                # CPU's reads a GQA group's K and V rows once, in place; SDPA expands them per query head)
                visible, _ = self._mask(batch, queries, keys, attention_mask, query.device, always=False)
                return dense_step(query, key, value, visible, scaling, ops, False).output.transpose(1, 2)
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)[0]
        visible, always = self._mask(batch, queries, keys, attention_mask, query.device, always=not blocks)
        if blocks:
            return self._block_prefill(layer_idx, query, key, value, visible, scaling)
        if dense_layer:  # full attention, keeping its weights where the momentum prior reads them
            self.stats.record_dense(layer_idx)
            want_prior = layer_idx in self.prior_layers()
            result = dense_step(query, key, value, visible, scaling, ops, want_prior)
            if want_prior:
                self.prior = update_prior(self.prior, result.probs, cfg.momentum_decay)
            return result.output.transpose(1, 2)

        encoder = self._encoders[layer_idx]
        cfg = self.layer_config(layer_idx)
        codes, norms, coded, layer = self._codes(layer_idx, key, encoder)
        plan = None if cfg.selector == "oracle" else self._plan(layer_idx, encoder, ops, heads, key.shape[1], scaling)
        want_prior = layer_idx in self.prior_layers()
        outputs, priors = [], []
        whole = queries <= cfg.chunk_size  # one block (decode): the forward's own mask tensors, whose
        # kernel rows the backend keeps for the next layers (a slice would be a new tensor each layer)
        for start in range(0, queries, cfg.chunk_size):
            rows = slice(start, min(start + cfg.chunk_size, queries))
            prior = self.prior if self.prior is not None and self.prior.shape[1] == queries else None
            if not whole:
                prior = prior[:, rows] if prior is not None else None
            result = tiered_step(
                query if whole else query[:, :, rows], key, value, codes, norms, encoder, cfg,
                visible if whole else visible[:, :, rows], scaling, prior, ops,
                always=always if whole else always[:, :, rows], want_prior=want_prior,
                want_weights=cfg.selector == "oracle", plan=plan, coded=coded,
            )  # fmt: skip
            if layer is not None and plan is not None:  # the step wrote the codes of the new keys
                layer.mark_coded()
                coded = None
            if result.counts is not None:
                self.stats.record_counts(layer_idx, result.counts)
            else:
                self.stats.record(layer_idx, result.tiers)
            outputs.append(result.output)
            if want_prior:
                priors.append(result.prior if result.prior is not None else update_prior(prior, result.probs, cfg.momentum_decay))
        self.prior = (priors[0] if len(priors) == 1 else torch.cat(priors, dim=1)) if want_prior else None
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        return output.transpose(1, 2)


# the keyword argument in which dashkv.enable's forward hook passes the running forward's DashKVRuntime
# (transformers hands a forward's extra keyword arguments down to the attention function)
RUNTIME_KWARG = "dashkv_runtime"


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
    runtime = kwargs.pop(RUNTIME_KWARG, None)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if runtime is None or module.layer_idx in runtime.sliding:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    return runtime.attend(module, query, key, value, attention_mask, scaling), None
