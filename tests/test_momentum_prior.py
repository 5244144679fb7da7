"""The cross-layer momentum prior is built only where a later layer reads it: layers before the last
tiered layer whose temporal discount is at least one whole bit. Skipping it elsewhere changes no logit."""

from __future__ import annotations

import pytest
import torch

import dashkv
from dashkv import DashKVConfig, HashEncoders
from dashkv.attention import DashKVRuntime


@pytest.fixture(scope="module")
def five_layers():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation="sdpa")  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


def _encoders(model, discounts: dict[int, float]) -> HashEncoders:
    """Random encoders whose layers' learned temporal discounts are ``discounts`` (others 0)."""
    enc = HashEncoders.random(model, bits=32, seed=3)
    with torch.no_grad():
        for i, layer in enumerate(enc.layers):
            layer.temporal_discount.fill_(discounts.get(i, 0.0))
    return enc


def test_prior_layers_are_those_before_the_last_reader(five_layers):
    reads_at_2 = _encoders(five_layers, {2: -3.0})
    assert DashKVRuntime(reads_at_2, DashKVConfig(bits=32)).prior_layers() == {0, 1}
    assert DashKVRuntime(reads_at_2, DashKVConfig(bits=32), sliding=frozenset({1})).prior_layers() == {0}
    # a dense layer reads no prior, whatever its encoder says
    assert DashKVRuntime(reads_at_2, DashKVConfig(bits=32, dense_layers=(0, 2))).prior_layers() == frozenset()
    # discounts under half a bit round to 0: nothing reads a prior, none is built
    assert DashKVRuntime(_encoders(five_layers, {2: -0.4}), DashKVConfig(bits=32)).prior_layers() == frozenset()
    # a discount set by the config applies to every tiered layer; momentum off builds nothing
    assert DashKVRuntime(reads_at_2, DashKVConfig(bits=32, temporal_discount=-2.0)).prior_layers() == {0, 1, 2, 3}
    assert DashKVRuntime(reads_at_2, DashKVConfig(bits=32, momentum=False)).prior_layers() == frozenset()


def _decode_logits(model, enc, cfg, ids: torch.Tensor) -> torch.Tensor:
    with dashkv.enable(model, enc, cfg):
        out = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)  # fmt: skip
    return torch.stack(out.logits)


def test_skipping_unread_priors_changes_no_logit(five_layers, monkeypatch):
    # layer 2 reads the prior of layers 0 and 1; layers 3 and 4 read none (their steps skip it)
    enc = _encoders(five_layers, {2: -4.0})
    cfg = DashKVConfig(bits=32, high=0.1, mid=0.1, sinks=1, window=2, momentum_ratio=1.0, dense_below=0)
    ids = torch.randint(1, 97, (1, 120), generator=torch.Generator().manual_seed(7))
    skipping = _decode_logits(five_layers, enc, cfg, ids)
    every = frozenset(range(5))
    monkeypatch.setattr(DashKVRuntime, "prior_layers", lambda self: every)
    assert torch.equal(_decode_logits(five_layers, enc, cfg, ids), skipping)
    # the check can fail: without the prior of layers 0 and 1, layer 2 chooses other tiers
    monkeypatch.setattr(DashKVRuntime, "prior_layers", lambda self: frozenset())
    assert not torch.equal(_decode_logits(five_layers, enc, cfg, ids), skipping)
