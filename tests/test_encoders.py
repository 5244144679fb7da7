import json

import pytest
import torch

from dashkv import DashKVConfig, HashEncoders


def test_save_load_round_trip_gives_identical_codes(tiny_qwen2, tmp_path):
    enc = HashEncoders.random(tiny_qwen2, bits=64, seed=3)
    with torch.no_grad():  # make the MLP matter, so the round trip covers every tensor
        enc.layers[1].query_mlp[-1].weight.normal_()
    enc.save_pretrained(tmp_path)
    loaded = HashEncoders.from_pretrained(tmp_path)
    q, k = torch.randn(2, 6, 5, 16), torch.randn(2, 2, 11, 16)
    for a, b in zip(enc.layers, loaded.layers):
        assert torch.equal(a.encode_query(q), b.encode_query(q))
        assert torch.equal(a.encode_key(k)[0], b.encode_key(k)[0])
    assert loaded.shape == enc.shape and loaded.fingerprint == enc.fingerprint


def test_half_precision_file_loads_into_float32_encoders_with_the_rounded_weights(tiny_qwen2, tmp_path):
    enc = HashEncoders.random(tiny_qwen2, bits=64, seed=3)
    enc.save_pretrained(tmp_path, dtype=torch.float16)
    loaded = HashEncoders.from_pretrained(tmp_path)
    full = (tmp_path / "encoders.safetensors").stat().st_size
    enc.save_pretrained(tmp_path / "fp32")
    assert full < 0.6 * (tmp_path / "fp32" / "encoders.safetensors").stat().st_size
    for name, value in loaded.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, enc.state_dict()[name].half().float())


def test_a_file_dtype_that_cannot_hold_the_weights_is_refused(tiny_qwen2, tmp_path):
    enc = HashEncoders.random(tiny_qwen2, bits=64, seed=3)
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        enc.save_pretrained(tmp_path, dtype=torch.int8)
    with torch.no_grad():
        enc.layers[0].key_proj.mul_(1e6)  # beyond float16's range
    with pytest.raises(ValueError, match="dtype=torch.float16 cannot hold"):
        enc.save_pretrained(tmp_path / "half", dtype=torch.float16)
    assert not (tmp_path / "half").exists()  # nothing half-written


def test_random_encoders_are_seeded_simhash(tiny_qwen2):
    a = HashEncoders.random(tiny_qwen2, bits=32, seed=1)
    b = HashEncoders.random(tiny_qwen2, bits=32, seed=1)
    c = HashEncoders.random(tiny_qwen2, bits=32, seed=2)
    x = torch.randn(1, 2, 4, 16)
    assert torch.equal(a.layers[0].encode_key(x)[0], b.layers[0].encode_key(x)[0])
    assert not torch.equal(a.layers[0].encode_key(x)[0], c.layers[0].encode_key(x)[0])
    # SimHash: a query equal to a key of its KV head gets the same code (distance 0)
    q = x.repeat_interleave(3, dim=1)  # 6 query heads over 2 KV heads
    assert torch.equal(a.layers[0].encode_query(q), a.layers[0].encode_key(x)[0].repeat_interleave(3, dim=1))


def test_encoders_of_another_model_are_refused(tiny_qwen2, default_model):
    model, _ = default_model
    enc = HashEncoders.random(tiny_qwen2, bits=64)
    with pytest.raises(ValueError, match=r"num_layers.*3.*num_layers.*30"):
        enc.check_compatible(model)


def test_unsupported_bits_are_refused(tiny_qwen2):
    with pytest.raises(ValueError, match="bits=24"):
        HashEncoders.random(tiny_qwen2, bits=24)


def test_from_pretrained_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HashEncoders.from_pretrained(tmp_path)


def test_dense_layers_of_the_encoders_are_saved_checked_and_read(tiny_qwen2, tmp_path):
    enc = HashEncoders.random(tiny_qwen2, bits=64, seed=3)
    assert enc.dense_layers == ()
    enc.dense_layers = [2, 1, 2]
    assert enc.dense_layers == (1, 2)
    enc.save_pretrained(tmp_path)
    assert HashEncoders.from_pretrained(tmp_path).dense_layers == (1, 2)
    for bad in ([3], [-1], [True], "1", [1.0]):  # the tiny model has layers 0..2
        with pytest.raises(ValueError, match="dense_layers=.*layer indices in 0..2"):
            enc.dense_layers = bad
    config = json.loads((tmp_path / "config.json").read_text())
    config["dense_layers"] = [7]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: dense_layers=\[7\] is not allowed"):
        HashEncoders.from_pretrained(tmp_path)
    del config["dense_layers"]  # files written before the field existed: no dense layers
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert HashEncoders.from_pretrained(tmp_path).dense_layers == ()


def test_budget_scales_of_the_encoders_are_saved_checked_and_read(tiny_qwen2, tmp_path):
    enc = HashEncoders.random(tiny_qwen2, bits=64, seed=3)
    assert enc.budget_scales == {} and enc.budget_scale(1) == 1.0
    enc.budget_scales = {2: 0.4, 1: 1.6}
    assert enc.budget_scales == {1: 1.6, 2: 0.4} and enc.budget_scale(2) == 0.4 and enc.budget_scale(0) == 1.0
    enc.save_pretrained(tmp_path)
    assert HashEncoders.from_pretrained(tmp_path).budget_scales == {1: 1.6, 2: 0.4}
    for bad in ({3: 1.0}, {-1: 1.0}, {1: 0.0}, {1: -2.0}, {1: float("inf")}, {1: float("nan")}, {True: 1.0},
                {1: True}, {"1": 1.0}, [(1, 1.0)]):  # fmt: skip
        with pytest.raises(ValueError, match="budget_scales=.*layer indices in 0..2 to positive finite numbers"):
            enc.budget_scales = bad
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["budget_scales"] == {"1": 1.6, "2": 0.4}
    for bad in ({"7": 1.0}, {"1": 0}, {"x": 1.0}, [1.0]):
        config["budget_scales"] = bad
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="config.json: budget_scales=.* is not allowed"):
            HashEncoders.from_pretrained(tmp_path)
    del config["budget_scales"]  # files written before the field existed: every layer at the config's share
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert HashEncoders.from_pretrained(tmp_path).budget_scales == {}


def test_the_encoders_sharing_is_saved_checked_and_fills_an_open_config(tiny_qwen2, tmp_path):
    """``HashEncoders.share`` is what ``enable`` runs where ``DashKVConfig.share`` is None (the default);
    a config that names a sharing keeps it."""
    from dashkv.apply import _resolve

    enc = HashEncoders.random(tiny_qwen2, bits=64, seed=3)
    assert enc.share == "head"
    enc.share = "union"
    enc.save_pretrained(tmp_path)
    assert HashEncoders.from_pretrained(tmp_path).share == "union"
    for bad in ("heads", None, 1):
        with pytest.raises(ValueError, match="share=.* is not allowed; share must be one of"):
            enc.share = bad
    assert _resolve(tiny_qwen2, enc, None)[1].share == "union"
    assert _resolve(tiny_qwen2, enc, {"high": 0.1})[1].share == "union"
    assert _resolve(tiny_qwen2, enc, DashKVConfig(bits=64, share="head"))[1].share == "head"
    config = json.loads((tmp_path / "config.json").read_text())
    config["share"] = "kv"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: share='kv' is not allowed"):
        HashEncoders.from_pretrained(tmp_path)
    del config["share"]  # files written before the field existed: per head
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert HashEncoders.from_pretrained(tmp_path).share == "head"
