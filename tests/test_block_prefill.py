"""The block prefill: its distance kernel equals the reference, it is exact when it keeps every key, it
keeps the key one query of a block needs, and it runs under ``enable`` on a model."""

import pytest
import torch
import torch.nn.functional as F

import dashkv
from dashkv import DashKVConfig, HashEncoders
from dashkv.attention import visibility
from dashkv.block_prefill import NOT_CANDIDATE, block_prefill_attention, choose_keys
from dashkv.cache import DashKVCache
from dashkv.codes import pack_bits, unpack_bits
from dashkv.encoders import LayerHashEncoder
from dashkv.ops import cpu, reference

BACKENDS = {"reference": reference, "cpu": cpu}


def _codes(shape, seed):
    return torch.randint(-(2**62), 2**62, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("words", [1, 2])
@pytest.mark.parametrize("block", [1, 5, 16])
def test_cpu_block_distance_equals_the_reference(words, block):
    queries = _codes((2, 6, 21, words), 1)  # 3 KV heads of 2 query heads; 21 is no multiple of 5 or 16
    keys = _codes((2, 3, 70, words), 2)
    expected = reference.block_distance(queries, keys, block)
    assert expected.shape == (2, 3, -(-21 // block), 70)
    assert torch.equal(cpu.block_distance(queries, keys, block), expected)
    # a key shared by the batch (batch 1) is served to every row alike
    assert torch.equal(cpu.block_distance(queries, keys[:1], block), reference.block_distance(queries, keys[:1], block))


def test_block_distance_is_the_nearest_query_of_the_block_and_group():
    queries, keys = _codes((1, 4, 8, 2), 3), _codes((1, 2, 30, 2), 4)
    dist = reference.hamming_distance(queries, keys)  # [1, 4, 8, 30]
    got = cpu.block_distance(queries, keys, 4)
    for kv in range(2):
        for j in range(2):
            rows = dist[0, 2 * kv : 2 * kv + 2, 4 * j : 4 * j + 4]
            assert torch.equal(got[0, kv, j], rows.reshape(-1, 30).amin(0))


def _inputs(batch=2, heads=4, kv_heads=2, dim=16, keys=300, queries=200, bits=64, seed=0):
    torch.manual_seed(seed)
    encoder = LayerHashEncoder(heads, kv_heads, dim, bits)
    torch.nn.init.normal_(encoder.key_proj)
    q = torch.randn(batch, heads, queries, dim)
    k, v = torch.randn(batch, kv_heads, keys, dim), torch.randn(batch, kv_heads, keys, dim)
    return encoder, q, k, v, encoder.encode_key(k)[0]


def _sdpa(q, k, v, visible, scaling):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=visible, scale=scaling)  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("padded", [False, True])
def test_keeping_every_key_equals_full_attention(backend, padded):
    encoder, q, k, v, codes = _inputs()
    visible = visibility(2, 200, 300, None, q.device)
    if padded:  # row 0 left-padded by 37 keys
        keep = torch.ones(2, 300, dtype=torch.bool)
        keep[0, :37] = False
        visible = visible & keep.view(2, 1, 1, 300)
    out, counts = block_prefill_attention(q, k, v, codes, encoder, visible, 0.25, BACKENDS[backend], share=1.0,
                                          sinks=4, window=8, block=16)  # fmt: skip
    torch.testing.assert_close(out, _sdpa(q, k, v, visible, 0.25), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [int(visible.sum()) * 4, 0, 0]


def test_a_share_attends_that_share_of_the_prefix_and_counts_it():
    encoder, q, k, v, codes = _inputs(batch=1)
    visible = visibility(1, 200, 300, None, q.device)
    out, counts = block_prefill_attention(q, k, v, codes, encoder, visible, 0.25, cpu, share=0.2, sinks=4,
                                          window=8, block=16)  # fmt: skip
    attended, mid, skipped = counts.tolist()
    assert mid == 0 and attended + skipped == int(visible.sum()) * 4
    assert 0.2 < attended / (attended + skipped) < 0.4  # the share, plus sinks and bands
    assert torch.isfinite(out).all() and not torch.allclose(out, _sdpa(q, k, v, visible, 0.25), atol=1e-3)


def test_the_key_one_query_needs_is_kept_for_its_whole_block():
    """A key whose code equals one query's is chosen for that query's block, even at a budget of one key
    and though the block's other queries are far from it: the nearest query decides, not the sum."""
    queries = _codes((1, 2, 64, 2), 5)
    keys = _codes((1, 1, 200, 2), 6)
    keys[0, 0, 17] = queries[0, 1, 40]  # query 40 of head 1, in block 1 of 32-query blocks
    block_bits = unpack_bits(queries[0, :, 32:].reshape(-1, 2), 128)  # the block's 64 rows
    keys[0, 0, 90] = pack_bits(block_bits.sum(0) * 2 > block_bits.shape[0])  # their bitwise majority
    dist = cpu.block_distance(queries, keys, 32)
    chosen, real = choose_keys(dist[:, :, 1], 1)
    assert chosen.tolist() == [[[17]]] and bool(real.all())
    assert dist[0, 0, 1, 17] == 0
    summed = reference.hamming_distance(queries[:, :, 32:], keys).sum((1, 2))[0]
    assert int(summed.argmin()) == 90  # a block-summed score prefers the majority code to the copied key


def test_rows_with_fewer_candidates_than_asked_are_marked():
    dist = torch.tensor([[[3, NOT_CANDIDATE, 1, NOT_CANDIDATE]]], dtype=torch.int32)
    chosen, real = choose_keys(dist, 3)
    assert sorted(chosen[real].tolist()) == [0, 2] and int((~real).sum()) == 1


def test_generate_after_a_block_prefill_equals_full_attention_with_every_key_kept(tiny_qwen2):
    enc = HashEncoders.random(tiny_qwen2, bits=32, seed=0)
    ids = torch.randint(3, 97, (2, 150), generator=torch.Generator().manual_seed(4))
    new = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        full = tiny_qwen2.generate(ids, **new)
        config = DashKVConfig.full(bits=32, dense_layers=(), prefill="blocks", prefill_block=16)
        with dashkv.enable(tiny_qwen2, enc, config) as stats:
            hashed = tiny_qwen2.generate(ids, **new)
    assert torch.equal(hashed, full)
    assert stats.summary()["mean"]["high"] == 1.0


def test_a_block_prefill_under_enable_skips_keys_and_leaves_the_cache_whole(tiny_qwen2):
    enc = HashEncoders.random(tiny_qwen2, bits=32, seed=0)
    ids = torch.randint(3, 97, (1, 400), generator=torch.Generator().manual_seed(5))
    config = DashKVConfig(bits=32, dense_layers=(), prefill="blocks", prefill_block=32, dense_below=0)
    cache = DashKVCache(enc, config.dense_layers)
    with torch.no_grad(), dashkv.enable(tiny_qwen2, enc, config) as stats:
        logits = tiny_qwen2(ids, past_key_values=cache, use_cache=True).logits
    assert torch.isfinite(logits).all()
    assert cache.get_seq_length() == 400  # nothing evicted: skipped keys stay for later steps
    assert 0.0 < stats.summary()["mean"]["low"] < 1.0


def test_prefill_block_is_checked():
    with pytest.raises(ValueError, match="prefill_block=0"):
        DashKVConfig(prefill="blocks", prefill_block=0)
    with pytest.raises(ValueError, match="prefill="):
        DashKVConfig(prefill="block")


def test_keeping_every_key_equals_full_attention_on_each_device(device):
    """The backend ``auto`` picks for the device (numba on the CPU, Triton's on a GPU)."""
    from dashkv.ops.dispatch import get_backend

    encoder, q, k, v, codes = _inputs()
    encoder, q, k, v, codes = encoder.to(device), q.to(device), k.to(device), v.to(device), codes.to(device)
    visible = visibility(2, 200, 300, None, q.device)
    out, _ = block_prefill_attention(q, k, v, codes, encoder, visible, 0.25, get_backend("auto", q.device),
                                     share=1.0, sinks=4, window=8, block=16)  # fmt: skip
    torch.testing.assert_close(out, _sdpa(q, k, v, visible, 0.25), rtol=1e-4, atol=1e-4)


def test_padded_query_positions_get_zeros_and_the_others_full_attention():
    """A first chunk (queries = keys) of a left-padded batch: padded positions see no key."""
    encoder, q, k, v, codes = _inputs(keys=120, queries=120)
    keep = torch.ones(2, 120, dtype=torch.bool)
    keep[0, :10] = False
    visible = visibility(2, 120, 120, None, q.device) & keep.view(2, 1, 1, 120)
    out, _ = block_prefill_attention(q, k, v, codes, encoder, visible, 0.25, cpu, share=1.0, sinks=4, window=8,
                                     block=16)  # fmt: skip
    assert torch.equal(out[0, :, :10], torch.zeros_like(out[0, :, :10]))
    torch.testing.assert_close(out[0, :, 10:], _sdpa(q, k, v, visible, 0.25)[0, :, 10:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], _sdpa(q, k, v, visible, 0.25)[1], rtol=1e-5, atol=1e-5)
