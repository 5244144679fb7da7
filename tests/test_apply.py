import copy

import pytest
import torch

import dashkv
from dashkv import DashKVCache, DashKVConfig, HashEncoders
from dashkv.attention import tiered_step, visibility
from dashkv.ops.reference import HIGH, LOW


def _ids(n, seed=0, vocab=97):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_tiny_qwen2_gqa_generates_under_dashkv(tiny_qwen2):
    enc = HashEncoders.random(tiny_qwen2, bits=32, seed=0)
    cfg = DashKVConfig(bits=32, high=0.1, mid=0.2, sinks=2, window=8, dense_layers=(), dense_below=0)
    ids = _ids(120)
    cache = DashKVCache(enc)
    with dashkv.enable(tiny_qwen2, enc, cfg) as stats:
        out = tiny_qwen2.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert out.shape == (1, 132)
    summary = stats.summary()
    assert set(summary) == {0, 1, 2, "mean"}
    assert 0 < summary["mean"]["low"] < 1 and summary["mean"]["mid"] > 0
    # nothing evicted: every key (prompt + generated but the last) is still in the cache, with its code
    assert cache.get_seq_length() == 131
    assert all(layer.codes.shape[-2] == 131 for layer in cache.layers)


@pytest.mark.parametrize("dense_layers", [(), (0,)])
@pytest.mark.parametrize("momentum", [False, True])
def test_full_config_equals_full_attention_logits(tiny_qwen2, dense_layers, momentum):
    enc = HashEncoders.random(tiny_qwen2, bits=DashKVConfig.bits, seed=0)
    ids = _ids(80, seed=1)
    with torch.no_grad():
        dense = tiny_qwen2(ids).logits
        for prefill in ("dense", "tiered"):
            cfg = DashKVConfig.full(prefill=prefill, chunk_size=16, dense_layers=dense_layers, momentum=momentum)
            with dashkv.enable(tiny_qwen2, enc, cfg):
                tiered = tiny_qwen2(ids).logits
            torch.testing.assert_close(tiered, dense, rtol=1e-4, atol=1e-4)
        # a question block over a cached prefix, through the tiers (and SDPA with a mask on dense layers)
        cfg = DashKVConfig.full(dense_layers=dense_layers, momentum=momentum)
        cache = DashKVCache(enc, dense_layers)
        with dashkv.enable(tiny_qwen2, enc, cfg):
            tiny_qwen2(ids[:, :60], past_key_values=cache)
            block = tiny_qwen2(ids[:, 60:], past_key_values=cache).logits
        torch.testing.assert_close(block, dense[:, 60:], rtol=1e-4, atol=1e-4)


def test_enable_restores_the_model_exactly(tiny_qwen2):
    enc = HashEncoders.random(tiny_qwen2, bits=32)
    before_impl = tiny_qwen2.config._attn_implementation
    state = {k: v.clone() for k, v in tiny_qwen2.state_dict().items()}
    ids = _ids(40, seed=2)
    with torch.no_grad():
        before = tiny_qwen2(ids).logits
        with dashkv.enable(tiny_qwen2, enc, DashKVConfig(bits=32, prefill="tiered", dense_layers=(), dense_below=0)):
            changed = tiny_qwen2(ids).logits
        after = tiny_qwen2(ids).logits
    assert not torch.allclose(changed, before)  # DASH-KV really ran
    assert torch.equal(after, before)
    assert tiny_qwen2.config._attn_implementation == before_impl
    assert not tiny_qwen2._forward_pre_hooks
    assert all(torch.equal(v, state[k]) for k, v in tiny_qwen2.state_dict().items())


def test_bad_input_raises_and_leaves_model_untouched(tiny_qwen2, default_model):
    model, _ = default_model
    other = HashEncoders.random(model, bits=64)
    impl = tiny_qwen2.config._attn_implementation
    with pytest.raises(ValueError, match="num_layers"):
        with dashkv.enable(tiny_qwen2, other):
            pass
    with pytest.raises(ValueError, match="config.bits"):
        with dashkv.enable(tiny_qwen2, HashEncoders.random(tiny_qwen2, bits=32), DashKVConfig(bits=64)):
            pass
    with pytest.raises(ValueError, match="dense_layers"):
        encoders = HashEncoders.random(tiny_qwen2, bits=DashKVConfig.bits)
        with dashkv.enable(tiny_qwen2, encoders, DashKVConfig(dense_layers=(7,))):
            pass
    assert tiny_qwen2.config._attn_implementation == impl and not tiny_qwen2._forward_pre_hooks


def test_nan_query_is_refused(tiny_qwen2):
    enc = HashEncoders.random(tiny_qwen2, bits=32)
    layer = tiny_qwen2.model.layers[1].self_attn
    handle = layer.q_proj.register_forward_hook(lambda m, i, o: o * float("nan"))
    try:
        with dashkv.enable(tiny_qwen2, enc, DashKVConfig(bits=32, dense_layers=())):
            with pytest.raises(ValueError, match="NaN"):
                tiny_qwen2(_ids(10))
    finally:
        handle.remove()
    assert tiny_qwen2.config._attn_implementation == "sdpa"


def test_unsupported_model_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        dashkv.enable(model, None).__enter__()


def test_padded_batch_matches_unpadded_rows(tiny_qwen2):
    enc = HashEncoders.random(tiny_qwen2, bits=32, seed=4)
    cfg = DashKVConfig(bits=32, high=0.2, mid=0.1, sinks=2, window=4, dense_layers=(), consensus=False, momentum=False)
    a, b = _ids(50, seed=5), _ids(30, seed=6)
    pad = torch.zeros(1, 20, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :20] = 0
    with dashkv.enable(tiny_qwen2, enc, cfg):
        both = tiny_qwen2.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        alone = tiny_qwen2.generate(b, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(both[1, -6:], alone[0, -6:])


def test_skipped_key_is_reactivated_at_next_step(tiny_qwen2):
    enc = HashEncoders.random(tiny_qwen2, bits=64, seed=0).layers[0]
    cfg = DashKVConfig(bits=64, high=0.05, mid=0.0, sinks=1, window=1, consensus=False, momentum=False)
    gen = torch.Generator().manual_seed(0)
    key, value = torch.randn(1, 2, 60, 16, generator=gen), torch.randn(1, 2, 60, 16, generator=gen)
    codes, norms = enc.encode_key(key)
    target = key[:, :, 30].repeat_interleave(3, dim=1).unsqueeze(2)  # [1, 6, 1, 16]
    visible = visibility(1, 1, 60, None, key.device)
    away = tiered_step(-target, key, value, codes, norms, enc, cfg, visible, 0.25)
    toward = tiered_step(target, key, value, codes, norms, enc, cfg, visible, 0.25)
    assert (away.tiers[..., 30] == LOW).all() and (away.probs[..., 30] == 0).all()
    assert (toward.tiers[..., 30] == HIGH).all() and (toward.probs[..., 30] > 0).all()


def test_enable_without_encoders_says_how_to_get_them(tiny_qwen2):
    with pytest.raises(ValueError, match="no shipped encoders.*HashEncoders.random"):
        with dashkv.enable(tiny_qwen2):
            pass
    assert tiny_qwen2.config._attn_implementation == "sdpa" and not tiny_qwen2._forward_pre_hooks


def test_short_caches_attend_exactly_below_dense_below(tiny_qwen2):
    """Below ``dense_below`` keys a layer runs exact attention (recorded as dense, output as without
    DASH-KV); from it on, the same decode goes through the tiers."""
    enc = HashEncoders.random(tiny_qwen2, bits=32, seed=0)
    ids = _ids(60, seed=3)
    with torch.no_grad():
        plain = tiny_qwen2.generate(ids, max_new_tokens=6, do_sample=False)
        short = DashKVConfig(bits=32, high=0.1, mid=0.2, sinks=2, window=8, dense_layers=(), dense_below=64)
        with dashkv.enable(tiny_qwen2, enc, short) as stats:
            out = tiny_qwen2.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=DashKVCache(enc))
    summary = stats.summary()
    # keys 60..63 attend exactly; from 64 keys on (the last two steps) the tiers run
    assert torch.equal(out[:, :64], plain[:, :64])
    assert 0 < summary["mean"]["low"] < 1
    with pytest.raises(ValueError, match="dense_below"):
        DashKVConfig(dense_below=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_short_decode_steps_take_the_dense_kernel_on_the_cpu(tiny_qwen2, monkeypatch, dtype):
    """Below ``dense_below`` a CPU decode step attends through the compiled dense kernel (reading a GQA
    group's K and V once), a prefill through transformers' SDPA; every step's output is the one plain
    full attention gives, token for token (bfloat16 K and V are read as such)."""
    from dashkv.ops import cpu

    tiny_qwen2 = copy.deepcopy(tiny_qwen2).to(dtype)  # the fixture is shared by the session
    enc = HashEncoders.random(tiny_qwen2, bits=32, seed=0)
    calls = []
    kernel = cpu.dense_attention
    monkeypatch.setattr(cpu, "dense_attention", lambda q, *a, **k: calls.append(q.shape[2]) or kernel(q, *a, **k))
    ids = _ids(40, seed=5)
    with torch.no_grad():
        plain = tiny_qwen2.generate(ids, max_new_tokens=5, do_sample=False)
        with dashkv.enable(tiny_qwen2, enc, DashKVConfig(bits=32, dense_layers=(), dense_below=4096)):
            out = tiny_qwen2.generate(ids, max_new_tokens=5, do_sample=False, past_key_values=DashKVCache(enc))
    layers = tiny_qwen2.config.num_hidden_layers
    assert calls == [1] * (4 * layers)  # the 4 decode steps after the prefill, every layer; not the prefill
    assert torch.equal(out, plain)


def test_key_codes_are_made_once_the_cache_reaches_dense_below(tiny_qwen2):
    """Exact attention below ``dense_below`` never codes a key; a prefill that reaches it codes all keys
    in one batch (the first tiered step then codes only its own new key)."""
    enc = HashEncoders.random(tiny_qwen2, bits=32, seed=0)
    cfg = DashKVConfig(bits=32, dense_layers=(0,), dense_below=50)
    for length, coded in ((40, 0), (60, 60)):
        cache = DashKVCache(enc, cfg.dense_layers)
        with torch.no_grad(), dashkv.enable(tiny_qwen2, enc, cfg):
            tiny_qwen2(_ids(length, seed=4), past_key_values=cache)
        assert [layer.coded for layer in cache.layers[1:]] == [coded] * (len(cache.layers) - 1)
        assert cache.layers[0].encoder is None  # the dense layer keeps no codes


def test_encoder_check_is_kept_until_a_weight_changes(tiny_qwen2):
    """``enable`` scans the encoders once; a weight changed in place (its version moves) is scanned again."""
    enc = HashEncoders.random(tiny_qwen2, bits=32, seed=0)
    cfg = DashKVConfig(bits=32)
    with dashkv.enable(tiny_qwen2, enc, cfg):
        pass
    stamp = enc._dashkv_checked[0]
    with dashkv.enable(tiny_qwen2, enc, cfg):
        pass
    assert enc._dashkv_checked[0] == stamp
    with torch.no_grad():
        enc.layers[1].key_proj[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        with dashkv.enable(tiny_qwen2, enc, cfg):
            pass
    assert tiny_qwen2.config._attn_implementation == "sdpa"
