import pytest
import torch

from dashkv import DashKVConfig, HashEncoders
from dashkv.training.layer_check import copy_document, layer_check, layers_to_leave_dense


def _ids(length: int = 480, tail: int = 64) -> torch.Tensor:
    prose = torch.randint(3, 97, (1, length - tail), generator=torch.Generator().manual_seed(1))
    return torch.cat([prose, prose[:, 40 : 40 + tail]], dim=1)


def test_every_served_layer_is_measured_alone_and_the_encoders_are_left_as_they_were(tiny_qwen2):
    encoders = HashEncoders.random(tiny_qwen2, bits=64, seed=0)
    encoders.dense_layers = (1,)  # measured anyway: the check decides these
    ids = _ids()
    exact = layer_check(tiny_qwen2, encoders, DashKVConfig.full(bits=64, dense_layers=(0,)), ids, tail=64)
    assert sorted(k for k in exact if k != "full") == [1, 2]
    assert all(exact[layer]["kl"] < 1e-6 for layer in (1, 2))  # every key high: full attention
    assert exact[1]["perplexity"] == pytest.approx(exact["full"]["perplexity"], rel=1e-4)
    assert layers_to_leave_dense(exact) == ()
    sparse = DashKVConfig(bits=64, high=0.02, mid=0.0, sinks=1, window=4, dense_layers=(), dense_below=0)
    check = layer_check(tiny_qwen2, encoders, sparse, ids, tail=64)
    assert sorted(k for k in check if k != "full") == [0, 1, 2]
    kls = [check[layer]["kl"] for layer in (0, 1, 2)]
    assert min(kls) > 1e-4 and len(set(kls)) == 3  # each run tiered one layer, a different one each time
    assert layers_to_leave_dense(check, max_kl=sorted(kls)[1]) == (kls.index(max(kls)),)
    assert encoders.dense_layers == (1,)


def test_the_copy_document_ends_with_a_far_copy(default_model):
    _, tokenizer = default_model
    ids = copy_document(tokenizer, 2048)
    start = (2048 - 256) // 8
    assert ids.shape == (1, 2048) and torch.equal(ids[0, -256:], ids[0, start : start + 256])
    with pytest.raises(ValueError, match="length=512 is too short"):
        copy_document(tokenizer, 512)
