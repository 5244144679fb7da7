"""The anchor test: with every key in the high tier, generate equals full attention token for token."""

import torch

import dashkv
from dashkv import DashKVConfig, HashEncoders
from dashkv.corpus import text


def test_all_high_generate_equals_full_attention_on_default_model(default_model):
    model, tok = default_model
    ids = tok(text("eval")[:6000], return_tensors="pt").input_ids[:, :1000]
    question = tok("\n\nIn one sentence, the text above is about", return_tensors="pt").input_ids
    ids = torch.cat([ids, question], dim=1)
    assert ids.shape[1] > 1000
    enc = HashEncoders.random(model, bits=64, seed=0)
    with torch.no_grad():
        full = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        with dashkv.enable(model, enc, DashKVConfig.full(dense_layers=())) as stats:
            hashed = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert stats.summary()["mean"]["high"] == 1.0
    assert torch.equal(hashed, full)
