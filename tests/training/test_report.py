"""Next-token KL of the held-out report: one shared dense prefill gives what separate runs give."""

import torch

import dashkv
from dashkv import DashKVCache, DashKVConfig, HashEncoders
from dashkv.training.report import next_token_kl

TAIL = 16


def _separate_runs(model, ids, encoders, config):
    """The report's first version: a full forward, then a DASH-KV prefill and tail, per method."""
    full = model(ids).logits[0, -TAIL:].log_softmax(-1)
    cache = DashKVCache(encoders, config.dense_layers)
    with dashkv.enable(model, encoders, config):
        model(ids[:, :-TAIL], past_key_values=cache)
        hashed = model(ids[:, -TAIL:], past_key_values=cache).logits[0].log_softmax(-1)
    return float((full.exp() * (full - hashed)).sum(-1).mean())


@torch.no_grad()
def test_shared_prefill_gives_the_kl_of_separate_runs(tiny_qwen2):
    ids = torch.randint(97, (1, 400), generator=torch.Generator().manual_seed(0))
    config = DashKVConfig(bits=32, high=0.05, mid=0.1, sinks=2, window=8, dense_layers=(0,), momentum=False,
                          dense_below=0)
    sets = {"a": HashEncoders.random(tiny_qwen2, bits=32, seed=0), "b": HashEncoders.random(tiny_qwen2, bits=32, seed=1)}
    shared = next_token_kl(tiny_qwen2, ids, sets, config, tail=TAIL)
    assert set(shared) == {"a", "b"}
    for name, encoders in sets.items():
        separate = _separate_runs(tiny_qwen2, ids, encoders, config)
        assert shared[name] > 1e-5  # the tiers change the distributions at this budget
        assert abs(shared[name] - separate) <= 1e-3 * separate, (name, shared[name], separate)


@torch.no_grad()
def test_kl_is_zero_when_every_key_is_high(tiny_qwen2):
    ids = torch.randint(97, (1, 300), generator=torch.Generator().manual_seed(1))
    encoders = HashEncoders.random(tiny_qwen2, bits=32, seed=0)
    kl = next_token_kl(tiny_qwen2, ids, {"all": encoders}, DashKVConfig.full(bits=32, dense_layers=()), tail=TAIL)
    assert abs(kl["all"]) < 1e-6
