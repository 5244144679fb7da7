import pytest
import torch
from transformers import DynamicCache

import dashkv
from dashkv import DashKVCache, DashKVConfig, HashEncoders
from dashkv.cache import DashKVLayer, upgrade_cache
from dashkv.ops import cpu, reference


def _ids(n, seed=0, vocab=97):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _states(batch, heads, length, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, length, dim, generator=g), torch.randn(batch, heads, length, dim, generator=g)


def test_layer_appends_in_place_and_grows_by_doubling():
    enc = HashEncoders.random(_shape_model(), bits=64, seed=0).layers[0]
    layer = DashKVLayer(enc)
    k, v = _states(2, 2, 1000)
    layer.update(k[:, :, :70], v[:, :, :70])
    first_buffer = layer._buffers["keys"]
    capacity = layer.capacity
    assert 70 < capacity < 1000 and capacity % 64 == 0  # room to decode after a prefill
    for s in range(70, 1000):  # one token at a time: no reallocation while it fits, then doubling
        keys, values = layer.update(k[:, :, s : s + 1], v[:, :, s : s + 1])
        if s + 1 <= capacity:
            assert layer._buffers["keys"] is first_buffer
        elif s == capacity:
            assert layer.capacity == 2 * capacity
    torch.testing.assert_close(keys, k, rtol=0, atol=0)
    torch.testing.assert_close(values, v, rtol=0, atol=0)
    codes, norms = enc.encode_key(k)
    assert torch.equal(layer.codes, codes) and torch.equal(layer.key_norms, norms)
    assert layer.get_seq_length() == 1000 and not keys.is_contiguous()  # a view of the buffer


def test_codes_are_computed_when_read_for_the_keys_added_since():
    enc = HashEncoders.random(_shape_model(), bits=64, seed=0).layers[0]
    layer = DashKVLayer(enc)
    k, v = _states(1, 2, 60)
    layer.update(k[:, :, :40], v[:, :, :40])
    assert layer.coded == 0 and "codes" not in layer._buffers  # exact attention never pays for codes
    assert torch.equal(layer.codes, enc.encode_key(k[:, :, :40])[0]) and layer.coded == 40
    calls = []
    encode = layer._encode
    layer._encode = lambda e, keys: calls.append(keys.shape[-2]) or encode(e, keys)
    layer.crop(30)
    layer.update(k[:, :, 30:60], v[:, :, 30:60])  # after a crop, the keys past it are new
    codes, norms = enc.encode_key(k)
    assert torch.equal(layer.key_norms, norms) and torch.equal(layer.codes, codes) and calls == [30]
    assert DashKVLayer(None).codes is None and layer.coded == 60


def test_crop_reorder_select_and_repeat_follow_the_keys():
    enc = HashEncoders.random(_shape_model(), bits=64, seed=0).layers[0]
    layer = DashKVLayer(enc)
    k, v = _states(3, 2, 50)
    layer.update(k, v)
    layer.crop(30)
    assert layer.get_seq_length() == 30 and torch.equal(layer.keys, k[:, :, :30])
    layer.update(k[:, :, 30:40], v[:, :, 30:40])  # writes after the crop point
    assert torch.equal(layer.keys, k[:, :, :40]) and layer.codes.shape[-2] == 40
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(layer.keys, k[[2, 0, 1], :, :40]) and torch.equal(layer.codes, enc.encode_key(k[[2, 0, 1], :, :40])[0])
    layer.batch_select_indices(torch.tensor([1, 2]))
    assert torch.equal(layer.values, v[[0, 1], :, :40])
    layer.batch_repeat_interleave(2)
    assert layer.keys.shape[0] == 4 and torch.equal(layer.keys[1], k[0, :, :40])
    with pytest.raises(ValueError, match="batch x heads"):
        layer.update(*_states(1, 2, 1))


def test_upgrade_keeps_a_dynamic_cache_and_encodes_a_codeless_one(tiny_qwen2):
    enc = HashEncoders.random(tiny_qwen2, bits=64, seed=0)
    ids = _ids(30)
    with torch.no_grad():
        plain = DynamicCache()
        tiny_qwen2(ids, past_key_values=plain)
        codeless = DashKVCache(None)
        tiny_qwen2(ids, past_key_values=codeless)
    held = [layer.keys.clone() for layer in plain.layers]
    for cache in (plain, codeless):
        upgrade_cache(cache, enc, dense_layers=(0,))
        assert all(isinstance(layer, DashKVLayer) for layer in cache.layers)
        assert cache.layers[0].codes is None  # dense layer: no codes
        for i in (1, 2):
            assert torch.equal(cache.layers[i].keys, held[i])
            assert torch.equal(cache.layers[i].codes, enc.layers[i].encode_key(held[i])[0])


def test_in_place_cache_generates_what_a_dynamic_cache_does(tiny_qwen2):
    ids = _ids(90, seed=3)
    kwargs = dict(max_new_tokens=20, do_sample=False)
    stock = tiny_qwen2.generate(ids, past_key_values=DynamicCache(), **kwargs)
    in_place = tiny_qwen2.generate(ids, past_key_values=DashKVCache(None), **kwargs)
    assert torch.equal(stock, in_place)
    beams = dict(max_new_tokens=8, do_sample=False, num_beams=3)
    assert torch.equal(
        tiny_qwen2.generate(ids, past_key_values=DynamicCache(), **beams),
        tiny_qwen2.generate(ids, past_key_values=DashKVCache(None), **beams),
    )


def test_dashkv_on_strided_cache_views_equals_contiguous_inputs(tiny_qwen2):
    enc = HashEncoders.random(tiny_qwen2, bits=128, seed=0)
    layer_enc = enc.layers[1]
    layer = DashKVLayer(layer_enc)
    k, v = _states(1, 2, 300, dim=16, seed=4)
    layer.update(k[:, :, :200], v[:, :, :200])
    for s in range(200, 300, 25):
        layer.update(k[:, :, s : s + 25], v[:, :, s : s + 25])
    assert layer.capacity > 300 and not layer.keys.is_contiguous()
    q = torch.randn(1, 6, 1, 16, generator=torch.Generator().manual_seed(5))
    qc = layer_enc.encode_query(q)
    args = dict(k_high=0.1, k_mid=0.2, scaling=0.3, return_probs=True, return_tiers=True, bits=128)
    strided = cpu.dash_attention(q, layer.keys, layer.values, qc, layer.codes, **args)
    dense = cpu.dash_attention(q, k, v, qc, layer.codes.contiguous(), **args)
    for a, b in zip(strided, dense):
        assert torch.equal(a, b)
    assert torch.equal(cpu.hamming_distance(qc, layer.codes), reference.hamming_distance(qc, layer.codes))


def test_enable_runs_on_an_in_place_cache_like_on_a_fresh_one(tiny_qwen2):
    enc = HashEncoders.random(tiny_qwen2, bits=64, seed=0)
    cfg = DashKVConfig(bits=64, high=0.1, mid=0.2, sinks=2, window=8)
    ids = _ids(120, seed=6)
    outs = []
    for cache in (DashKVCache(None), DashKVCache(enc, cfg.dense_layers), DynamicCache()):
        with dashkv.enable(tiny_qwen2, enc, cfg):
            outs.append(tiny_qwen2.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=cache))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


_SHAPE_MODEL = None


def _shape_model():
    """A stand-in with the geometry HashEncoders.random reads (no weights needed beyond the config)."""
    global _SHAPE_MODEL
    if _SHAPE_MODEL is None:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        _SHAPE_MODEL = LlamaForCausalLM(cfg)
    return _SHAPE_MODEL
