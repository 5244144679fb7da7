import pytest
import torch

from dashkv import DashKVConfig, HashEncoders
from dashkv.training.layer_check import allocate_budget, copy_document, layer_check, layers_to_leave_dense


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


def _row(kl: float, fewer: float, more: float) -> dict:
    return {"kl": kl, "perplexity": 1.0, "kl_at": {0.4: fewer, 1.6: more}}


def test_the_budget_moves_from_layers_that_lose_least_to_layers_that_gain_most():
    check = {"full": {"perplexity": 1.0},
             5: _row(0.0056, 0.02, 0.002),     # gains 0.0036 from more keys
             17: _row(0.0008, 0.0009, 0.0007),  # loses 0.0001 with fewer
             20: _row(0.003, 0.005, 0.0025),    # gains 0.0005, loses 0.002
             23: _row(0.001, 0.0012, 0.0009)}   # fmt: skip
    assert allocate_budget(check, step=0.6) == {5: 1.6, 17: 0.4, 20: 1.6, 23: 0.4}  # mean scale 1
    # a pair only where the gain exceeds the loss: 20 gains 0.0005 and the next giver loses 0.002
    check[23] = _row(0.001, 0.004, 0.0009)
    assert allocate_budget(check, step=0.6) == {5: 1.6, 17: 0.4}
    assert allocate_budget(check, dense=(17,), step=0.6) == {5: 1.6, 20: 0.4}  # 20 loses 0.002, 23 0.003
    assert allocate_budget({"full": {}, 5: _row(0.01, 0.02, 0.001)}, step=0.6) == {}  # no one to give


def test_the_check_measures_each_layer_at_the_scaled_shares_too(tiny_qwen2):
    encoders = HashEncoders.random(tiny_qwen2, bits=64, seed=0)
    encoders.budget_scales = {1: 3.0}  # ignored by the check: every layer is measured at the config's share
    sparse = DashKVConfig(bits=64, high=0.05, mid=0.0, sinks=1, window=4, dense_layers=(), dense_below=0)
    plain = layer_check(tiny_qwen2, encoders, sparse, _ids(), tail=64)
    check = layer_check(tiny_qwen2, encoders, sparse, _ids(), tail=64, scales=(0.4, 1.6))
    for layer in (0, 1, 2):
        assert check[layer]["kl"] == plain[layer]["kl"]
        assert set(check[layer]["kl_at"]) == {0.4, 1.6}
    # more keys in the high tier bring a layer closer to full attention, fewer take it further
    assert sum(check[i]["kl_at"][1.6] for i in (0, 1, 2)) < sum(check[i]["kl"] for i in (0, 1, 2))
    assert sum(check[i]["kl_at"][0.4] for i in (0, 1, 2)) > sum(check[i]["kl"] for i in (0, 1, 2))
    assert encoders.budget_scales == {1: 3.0}
