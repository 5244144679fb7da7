"""The anchor test: with every key in the high tier, generate equals full attention token for token."""

import copy

import torch

import dashkv
from dashkv import DashKVConfig, HashEncoders
from dashkv.corpus import text


def _assert_all_high_generate_equals_full(model, ids: torch.Tensor, new_tokens: int) -> None:
    enc = HashEncoders.random(model, bits=DashKVConfig.bits, seed=0)
    with torch.no_grad():
        full = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        with dashkv.enable(model, enc, DashKVConfig.full(dense_layers=())) as stats:
            hashed = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert stats.summary()["mean"]["high"] == 1.0
    assert torch.equal(hashed, full)


def test_all_high_generate_equals_full_attention_on_default_model(default_model):
    model, tok = default_model
    ids = tok(text("eval")[:6000], return_tensors="pt").input_ids[:, :1000]
    question = tok("\n\nIn one sentence, the text above is about", return_tensors="pt").input_ids
    ids = torch.cat([ids, question], dim=1)
    assert ids.shape[1] > 1000
    _assert_all_high_generate_equals_full(model, ids, 32)


def test_all_high_generate_equals_full_attention_on_each_device(tiny_qwen2, device):
    """A tiny GQA model, batched, on the CPU and (where there is one) a GPU."""
    model = copy.deepcopy(tiny_qwen2).to(device)
    ids = torch.randint(3, 97, (2, 150), generator=torch.Generator().manual_seed(2)).to(device)
    _assert_all_high_generate_equals_full(model, ids, 16)
