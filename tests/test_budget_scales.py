"""Encoders' ``budget_scales`` share the high tier unevenly between layers: each tiered layer runs
``high`` times its scale (the rest of the config as given), and a config with every key high stays exact."""

from __future__ import annotations

import torch

import dashkv
from dashkv import DashKVConfig, HashEncoders
from dashkv.cache import DashKVCache


def _high_counts(model, enc, cfg, ids: torch.Tensor) -> dict[int, int]:
    """High-tier keys per layer over a dense prefill and 4 decode steps."""
    with dashkv.enable(model, enc, cfg) as stats:
        model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0,
                       past_key_values=DashKVCache(enc, cfg.dense_layers))  # fmt: skip
    return {layer: int(counts[0]) for layer, counts in stats.counts.items()}


def test_each_layer_runs_its_scaled_high_share(tiny_qwen2):
    ids = torch.randint(1, 97, (1, 300), generator=torch.Generator().manual_seed(2))
    cfg = DashKVConfig(bits=64, high=0.1, mid=0.1, sinks=1, window=1, dense_layers=(), dense_below=0)
    enc = HashEncoders.random(tiny_qwen2, bits=64, seed=5)
    even = _high_counts(tiny_qwen2, enc, cfg, ids)
    enc.budget_scales = {1: 2.0, 2: 0.5}
    scaled = _high_counts(tiny_qwen2, enc, cfg, ids)
    assert scaled[0] == even[0]
    # sinks and window (2 keys a step) are high in any case; the rest moves with the scale
    always = 2 * 4 * tiny_qwen2.config.num_attention_heads
    assert abs((scaled[1] - always) / (even[1] - always) - 2.0) < 0.05
    assert abs((scaled[2] - always) / (even[2] - always) - 0.5) < 0.05


def test_every_key_high_stays_exact_whatever_the_scales(tiny_qwen2):
    ids = torch.randint(1, 97, (1, 120), generator=torch.Generator().manual_seed(3))
    enc = HashEncoders.random(tiny_qwen2, bits=64, seed=5)
    enc.budget_scales = {0: 0.4, 1: 1.6}
    full = tiny_qwen2.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with dashkv.enable(tiny_qwen2, enc, DashKVConfig.full(bits=64, dense_layers=())):
        tiered = tiny_qwen2.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(tiered, full)
