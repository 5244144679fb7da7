"""Methods that run through DASH-KV's tiered attention: DASH-KV itself, its ablation rows, plain
random-projection hashing (SimHash) and the oracle top-k selector.

All of them decode from the shared dense prefill: the keys are encoded into a
:class:`~dashkv.DashKVCache` (codes computed once per key) and the question and answer tokens go through
the tiers. The budget is the high tier's share; only full DASH-KV rows add a mid tier (``mid_ratio``
times the budget, reported beside it).
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace

import torch
from transformers.cache_utils import Cache

import dashkv
from dashkv.cache import DashKVCache
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders
from dashkv.prefilled import Prefill
from dashkv.baselines.budget import Budget
from dashkv.baselines.method import Method


@dataclass
class TieredMethod(Method):
    """A method that runs DASH-KV's attention with ``config`` and ``encoders``."""

    encoders: HashEncoders | None = None
    config: DashKVConfig = field(default_factory=DashKVConfig)

    def build_cache(self, model, prefill: Prefill) -> Cache:
        def build() -> Cache:
            cache = DashKVCache(self.encoders, self.config.dense_layers)
            for layer, (keys, values) in zip(cache.layers, prefill.keys_values()):
                layer.update(keys, values)
            return cache

        # key codes depend only on the encoders' layers: one hashed cache per set of layers serves every
        # budget (and the oracle's copy of the DASH-KV encoders)
        return prefill.reuse(("tiered", id(self.encoders.layers), self.config.dense_layers), build)

    def context(self, model) -> AbstractContextManager:
        return dashkv.enable(model, self.encoders, self.config)

    def describe(self, prefill: Prefill) -> dict:
        budget = Budget(self.budget, self.config.sinks, self.config.window)
        return {"kept": budget.kept(prefill.length), "kept_share": budget.kept(prefill.length) / prefill.length,
                "mid_share": self.config.mid}


def tiered(name: str, encoders: HashEncoders, budget: Budget, mid: float = 0.0, **settings) -> TieredMethod:
    """A tiered method at ``budget``: high = ``budget.share``, mid as given, calibration off unless set."""
    settings.setdefault("consensus", False)
    settings.setdefault("momentum", False)
    settings.setdefault("dense_below", 0)  # score the method at every length, not the dense fallback
    config = DashKVConfig(bits=encoders.bits, high=budget.share, mid=mid, sinks=budget.sinks,
                          window=budget.window, **settings)
    return TieredMethod(name=name, budget=budget.share, encoders=encoders, config=config)


def dashkv_method(encoders: HashEncoders, budget: Budget, mid_ratio: float = 3.0, name: str = "dashkv",
                  share: str | None = None) -> TieredMethod:
    """Full DASH-KV: hashing, cross-head consensus, cross-layer momentum and the mid tier; tiers shared
    as ``share`` says (None: the config's default)."""
    mid = min(mid_ratio * budget.share, 1.0 - budget.share)
    settings = {} if share is None else {"share": share}
    return tiered(name, encoders, budget, mid=mid, consensus=True, momentum=True, **settings)


def simhash_method(encoders: HashEncoders, budget: Budget) -> TieredMethod:
    """Random-projection hashing (``encoders`` from ``HashEncoders.random``): the top keys by Hamming
    distance, nothing else."""
    return tiered("simhash", encoders, budget)


def oracle_method(encoders: HashEncoders, budget: Budget) -> TieredMethod:
    """Oracle top-k: the keys of largest exact ``q.k`` (the encoders are not used for selection; any
    fill the slot, and sharing the DASH-KV ones saves encoding a cache), the same share in every layer
    (the ceiling at the budget, whatever ``budget_scales`` the DASH-KV encoders carry)."""
    even = copy.copy(encoders)  # the same modules: the prefill's hashed cache is shared all the same
    even.budget_scales = {}
    return tiered("oracle", even, budget, selector="oracle")


def symmetric(encoders: HashEncoders) -> HashEncoders:
    """The same encoders with the query side replaced by the key's linear map (no MLP, no centring
    difference): the "symmetric encoders" row of the ablation. For random-projection encoders this is
    the identity (SimHash is symmetric by construction)."""
    sym = HashEncoders(encoders.shape, bits=encoders.bits, hidden=encoders.hidden, fingerprint=encoders.fingerprint,
                       dense_layers=encoders.dense_layers, budget_scales=encoders.budget_scales,
                       share=encoders.share)  # fmt: skip
    sym.load_state_dict(encoders.state_dict())
    groups = encoders.shape["num_heads"] // encoders.shape["num_kv_heads"]
    with torch.no_grad():
        for layer in sym.layers:
            layer.query_skip.copy_(layer.key_proj.repeat_interleave(groups, dim=0))
            layer.query_mlp[-1].weight.zero_()
            layer.query_mlp[-1].bias.zero_()
    return sym.eval()


def ablation_methods(model, encoders: HashEncoders, budget: Budget, bits: tuple[int, ...] = (16, 32, 64, 128),
                     mid_ratio: float = 3.0, seed: int = 0, trained: bool = True) -> list[TieredMethod]:
    """The paper's ablation as rows: hash only, + consensus, + momentum, (+ mid tier = full DASH-KV,
    the ``dashkv`` row), symmetric encoders, and other code lengths (random encoders: trained ones are
    made for one length).

    With random-projection encoders (``trained=False``) "hash only" is the ``simhash`` row and
    "symmetric" the ``dashkv`` row exactly (SimHash is symmetric), so those two rows are not repeated.
    """
    rows = [tiered("abl:hash-only", encoders, budget)] if trained else []
    rows += [
        tiered("abl:+consensus", encoders, budget, consensus=True),
        tiered("abl:+momentum", encoders, budget, consensus=True, momentum=True),
    ]
    if trained:
        rows.append(replace(dashkv_method(symmetric(encoders), budget, mid_ratio), name="abl:symmetric"))
    for b in bits:
        if b != encoders.bits:
            rows.append(dashkv_method(HashEncoders.random(model, bits=b, seed=seed), budget, mid_ratio, name=f"abl:bits{b}"))
    return rows
