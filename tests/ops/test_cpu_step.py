"""The method step through the fused CPU kernel against the reference chain of ops.

``attention.tiered_step`` runs one fused kernel when the backend has ``dash_attention`` (the numba
backend) and the reference ops one by one otherwise: distances, cross-head consensus, momentum,
calibration, tiers, tiered attention. Both must agree: tiers exactly, outputs and weights within fp32
rounding, for GQA groups, blocks of query tokens, padding, 1 and 2 code words and every calibration
switch."""

from __future__ import annotations

import pytest
import torch

from dashkv.attention import tiered_step, visibility
from dashkv.config import DashKVConfig
from dashkv.encoders import LayerHashEncoder
from dashkv.ops import reference as ref

cpu = pytest.importorskip("dashkv.ops.cpu", reason="the cpu backend needs numba")
import dashkv.ops.cpu.api  # noqa: E402  (the chunk fixture shrinks its CHUNK)


def _encoder(gen, heads, kv_heads, dim, bits):
    enc = LayerHashEncoder(heads, kv_heads, dim, bits).eval()
    with torch.no_grad():
        enc.key_proj.normal_(generator=gen)
        enc.query_skip.copy_(enc.key_proj.repeat_interleave(heads // kv_heads, dim=0))
        enc.key_center.normal_(generator=gen)
        enc.mid_temperature.uniform_(0.5, 1.5, generator=gen)
        enc.mid_bias.normal_(generator=gen)
        enc.residual.normal_(generator=gen).mul_(0.05)
    return enc


# (batch, heads, kv heads, tokens, keys, bits)
SHAPES = [(1, 9, 3, 1, 1000, 64), (2, 4, 1, 3, 300, 128), (1, 8, 2, 2, 4097, 32), (1, 3, 3, 1, 65, 64)]
CONFIGS = {
    "default": dict(),
    "no-consensus": dict(consensus=False),
    "no-mid": dict(mid=0.0),
    "strong-discounts": dict(spatial_discount=-9.0, temporal_discount=-5.0, vote_fraction=0.25),
    "discounts-past-a-byte": dict(spatial_discount=-100.0, temporal_discount=-100.0, vote_fraction=0.25),
    "largest-discounts": dict(spatial_discount=-4096.0, temporal_discount=-4096.0),
    "no-calibration": dict(consensus=False, momentum=False),
}


@pytest.fixture(params=[None, 64], ids=["chunk=default", "chunk=64"])
def chunk(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(cpu.api, "CHUNK", request.param)


@pytest.mark.parametrize("share", ["head", "group", "union"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}H{h}kv{k}T{t}S{s}R{r}" for b, h, k, t, s, r in SHAPES])
def test_fused_step_matches_the_reference_chain(shape, name, share, chunk):
    batch, heads, kv_heads, tokens, keys, bits = shape
    gen = torch.Generator().manual_seed(keys + tokens)
    dim = 16
    enc = _encoder(gen, heads, kv_heads, dim, bits)
    base = dict(bits=bits, high=0.1, mid=0.2, sinks=2, window=8, dense_layers=(), share=share)
    cfg = DashKVConfig(**{**base, **CONFIGS[name]})
    query = torch.randn(batch, heads, tokens, dim, generator=gen)
    key = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    value = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    codes, norms = enc.encode_key(key)
    visible = visibility(batch, tokens, keys, None, key.device).clone()
    if batch > 1:
        visible[1, ..., : keys // 4] = False  # left padding
    prior = torch.softmax(torch.randn(batch, tokens, keys, generator=gen) * 3, dim=-1)
    args = (query, key, value, codes, norms, enc, cfg, visible, dim**-0.5, prior)
    expected = tiered_step(*args, ops=ref, want_prior=True)
    got = tiered_step(*args, ops=cpu, want_prior=True)
    assert torch.equal(got.tiers, expected.tiers)
    assert torch.equal(got.counts, expected.counts)
    torch.testing.assert_close(got.output, expected.output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.probs, expected.probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.prior, expected.prior, rtol=1e-5, atol=1e-6)
    if share != "head":  # one selection per KV head: the group's query heads share their tiers
        grouped = got.tiers.view(batch, kv_heads, heads // kv_heads, tokens, keys)
        assert (grouped == grouped[:, :, :1]).all()
    # without the weights (the decode path): the same output, prior and counts
    lean = tiered_step(*args, ops=cpu, want_prior=True, want_weights=False)
    assert lean.probs is None and lean.tiers is None and torch.equal(lean.counts, got.counts)
    torch.testing.assert_close(lean.output, got.output, rtol=0, atol=0)
    torch.testing.assert_close(lean.prior, got.prior, rtol=1e-6, atol=1e-9)  # fastmath: summation order


def test_calibration_changes_the_tiers():
    """The discounts matter in these cases (else the test above would not test them)."""
    gen = torch.Generator().manual_seed(1)
    enc = _encoder(gen, 9, 3, 16, 64)
    key = torch.randn(1, 3, 1000, 16, generator=gen)
    codes, norms = enc.encode_key(key)
    query = torch.randn(1, 9, 1, 16, generator=gen)
    visible = visibility(1, 1, 1000, None, key.device)
    prior = torch.softmax(torch.randn(1, 1, 1000, generator=gen) * 3, dim=-1)
    base = dict(bits=64, high=0.1, mid=0.2, sinks=2, window=8, dense_layers=())
    plain = DashKVConfig(**base, consensus=False, momentum=False)
    calibrated = DashKVConfig(**base, **CONFIGS["strong-discounts"])
    a = tiered_step(query, key, key, codes, norms, enc, plain, visible, 0.25, prior, ops=cpu)
    b = tiered_step(query, key, key, codes, norms, enc, calibrated, visible, 0.25, prior, ops=cpu)
    assert not torch.equal(a.tiers, b.tiers)


def test_whole_number_budgets_in_the_config_are_shares_on_both_paths():
    """``DashKVConfig(high=1, mid=0)`` (ints) means every key high, on the fused path as on the reference."""
    gen = torch.Generator().manual_seed(2)
    enc = _encoder(gen, 4, 2, 16, 64)
    key, value = torch.randn(2, 1, 2, 300, 16, generator=gen)
    codes, norms = enc.encode_key(key)
    query = torch.randn(1, 4, 1, 16, generator=gen)
    visible = visibility(1, 1, 300, None, key.device)
    cfg = DashKVConfig(bits=64, high=1, mid=0, consensus=False, momentum=False, dense_layers=())
    fused = tiered_step(query, key, value, codes, norms, enc, cfg, visible, 0.25, None, ops=cpu)
    reference = tiered_step(query, key, value, codes, norms, enc, cfg, visible, 0.25, None, ops=ref)
    assert (fused.tiers == ref.HIGH).all()
    assert torch.equal(fused.tiers, reference.tiers)
    torch.testing.assert_close(fused.output, reference.output)


@pytest.mark.parametrize("ops", [ref, cpu], ids=["reference", "cpu"])
def test_the_step_codes_the_keys_added_since_the_codes_were_read(ops):
    """A decode step over a cache whose newest keys have no codes yet (``coded``) writes their codes and
    norms into the cache's buffers, by the plan's encoder, and attends as if they had been there."""
    from dashkv.cache import DashKVLayer

    gen = torch.Generator().manual_seed(3)
    enc = _encoder(gen, 9, 3, 16, 128)
    key, value = torch.randn(2, 1, 3, 300, 16, generator=gen)
    layer = DashKVLayer(enc)
    layer.update(key[:, :, :296], value[:, :, :296])
    assert layer.code_views()[2] == 296  # a prefill's keys are coded in one batch
    layer.update(key[:, :, 296:], value[:, :, 296:])
    codes, norms, coded = layer.code_views()
    assert coded == 296
    codes[:, :, coded:] = 12345  # whatever the buffers held
    norms[:, :, coded:] = -1.0
    cfg = DashKVConfig(bits=128, high=0.1, mid=0.2, sinks=2, window=8, dense_layers=())
    query = torch.randn(1, 9, 1, 16, generator=gen)
    visible = visibility(1, 1, 300, None, key.device)
    got = tiered_step(query, layer.keys, layer.values, codes, norms, enc, cfg, visible, 0.25, None, ops=ops,
                      want_weights=False, coded=coded)  # fmt: skip
    new_codes, new_norms = ops.encode_key(enc, key[:, :, 296:])
    assert torch.equal(codes[:, :, 296:], new_codes)
    torch.testing.assert_close(norms[:, :, 296:], new_norms, rtol=1e-6, atol=1e-6)
    whole = tiered_step(query, layer.keys, layer.values, codes.clone(), norms.clone(), enc, cfg, visible, 0.25, None,
                        ops=ops, want_weights=False)  # fmt: skip
    torch.testing.assert_close(got.output, whole.output, rtol=0, atol=0)
    assert torch.equal(got.counts, whole.counts)


def test_union_joins_each_heads_own_selection():
    """``share="union"``: every head's own high keys are high for the whole group (a superset of what
    ``share="head"`` gives each head, so at least as much of each head's exact attention), and a key is
    low only where it is low for every head of the group."""
    gen = torch.Generator().manual_seed(4)
    enc = _encoder(gen, 8, 2, 16, 64)
    key, value = torch.randn(2, 1, 2, 2000, 16, generator=gen)
    codes, norms = enc.encode_key(key)
    query = torch.randn(1, 8, 1, 16, generator=gen)
    visible = visibility(1, 1, 2000, None, key.device)
    base = dict(bits=64, high=0.05, mid=0.15, sinks=2, window=8, dense_layers=())
    args = (query, key, value, codes, norms, enc)
    head = tiered_step(*args, DashKVConfig(**base, share="head"), visible, 0.25, None, ops=cpu)
    union = tiered_step(*args, DashKVConfig(**base, share="union"), visible, 0.25, None, ops=cpu)
    per_head = head.tiers.view(1, 2, 4, 1, 2000)
    joined = union.tiers.view(1, 2, 4, 1, 2000)
    assert torch.equal(joined[:, :, 0], per_head.amax(2))
    assert ((head.tiers == ref.HIGH) <= (union.tiers == ref.HIGH)).all()
    assert (union.tiers == ref.HIGH).sum() > (head.tiers == ref.HIGH).sum()  # the heads chose differently
