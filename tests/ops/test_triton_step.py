"""The Triton decode step against the reference chain, through :func:`dashkv.attention.tiered_step`:
tiers and counts exactly equal, outputs, weights and the momentum prior within a dtype-keyed tolerance;
both sharing modes, every calibration switch, GQA ratios 1 / 3 / 4 / 8, 32 to 128 bits, batch 2 with
left padding, blocks of query tokens, fp32 / bf16 / fp16.

GPU: ``pytest -m cuda`` (compiled kernels); no GPU: Triton's interpreter, in the default run. The
interpreter is slow, so the cases are a chosen list, not a cross product.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the triton backend needs triton (pip install 'dashkv[gpu]')")

from dashkv.attention import tiered_step, visibility  # noqa: E402
from dashkv.config import DashKVConfig  # noqa: E402
from dashkv.encoders import LayerHashEncoder  # noqa: E402
from dashkv.ops import reference as ref  # noqa: E402
from dashkv.ops import triton as tb  # noqa: E402
from dashkv.ops.reference import StepInputs, StepSettings  # noqa: E402
from dashkv.ops.triton import common  # noqa: E402

pytestmark = pytest.mark.cuda
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

CONFIGS = {
    "default": dict(),
    "no-consensus": dict(consensus=False),
    "no-mid": dict(mid=0.0),
    "strong-discounts": dict(spatial_discount=-9.0, temporal_discount=-5.0, vote_fraction=0.25),
    "no-calibration": dict(consensus=False, momentum=False),
}
# (batch, heads, kv heads, tokens, keys, bits), config, share
CASES = [
    ((1, 9, 3, 1, 400, 64), "default", "head"),
    ((1, 9, 3, 1, 400, 64), "strong-discounts", "group"),
    ((2, 4, 1, 3, 65, 128), "default", "group"),
    ((2, 4, 1, 3, 65, 128), "no-consensus", "head"),
    ((1, 8, 1, 2, 63, 32), "strong-discounts", "head"),
    ((1, 8, 1, 2, 63, 32), "no-mid", "group"),
    ((1, 3, 3, 1, 7, 64), "no-calibration", "head"),
    ((1, 3, 3, 1, 7, 64), "default", "group"),
    ((2, 2, 2, 1, 1, 64), "default", "head"),
    ((1, 9, 3, 1, 400, 64), "default", "union"),
    ((2, 4, 1, 3, 65, 128), "strong-discounts", "union"),
    ((1, 8, 1, 2, 63, 32), "no-mid", "union"),
]
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 128 keys: several chunks (tie bases, split-K merge) at lengths the interpreter affords."""
    monkeypatch.setattr(common, "CHUNK", 128)


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


def _case(shape, name, share, dtype=torch.float32):
    batch, heads, kv_heads, tokens, keys, bits = shape
    gen = torch.Generator().manual_seed(keys + tokens)
    dim = 16
    enc = _encoder(gen, heads, kv_heads, dim, bits)
    base = dict(bits=bits, high=0.1, mid=0.2, sinks=2, window=8, dense_layers=(), share=share)
    cfg = DashKVConfig(**{**base, **CONFIGS[name]})
    query, key, value = (torch.randn(batch, h, n, dim, generator=gen).to(dtype)
                         for h, n in ((heads, tokens), (kv_heads, keys), (kv_heads, keys)))  # fmt: skip
    codes, norms = enc.encode_key(key)
    visible = visibility(batch, tokens, keys, None, key.device).clone()
    if batch > 1:
        visible[1, ..., : keys // 4] = False  # left padding
    prior = torch.softmax(torch.randn(batch, tokens, keys, generator=gen) * 3, dim=-1)
    return enc, cfg, (query, key, value, codes, norms), visible, dim**-0.5, prior


def _compare(shape, name, share, dtype):
    enc, cfg, tensors, visible, scaling, prior = _case(shape, name, share, dtype)
    expected = tiered_step(*tensors, enc, cfg, visible, scaling, prior, ops=ref, want_prior=True)
    on = [t.to(DEVICE) for t in (*tensors, visible, prior)]
    got = tiered_step(*on[:5], enc.to(DEVICE), cfg, on[5], scaling, on[6], ops=tb, want_prior=True)
    assert got.output.dtype == dtype and got.output.device.type == DEVICE.type
    assert torch.equal(got.tiers.cpu(), expected.tiers)
    assert torch.equal(got.counts.cpu(), expected.counts)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.output.cpu(), expected.output, rtol=rtol, atol=atol)
    wtol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-3, 1e-5)  # weights from fp32 logits of 16-bit rows
    torch.testing.assert_close(got.probs.cpu(), expected.probs, rtol=wtol[0], atol=wtol[1])
    torch.testing.assert_close(got.prior.cpu(), expected.prior, rtol=wtol[0], atol=wtol[1])
    if share != "head":  # one selection per KV head: the group's query heads share their tiers
        batch, heads, kv_heads, tokens, keys, _ = shape
        grouped = got.tiers.view(batch, kv_heads, heads // kv_heads, tokens, keys)
        assert (grouped == grouped[:, :, :1]).all()


@pytest.mark.parametrize(("shape", "name", "share"), CASES,
                         ids=[f"B{s[0]}H{s[1]}kv{s[2]}T{s[3]}S{s[4]}R{s[5]}-{n}-{sh}" for s, n, sh in CASES])  # fmt: skip
def test_decode_step_matches_the_reference_chain(shape, name, share):
    _compare(shape, name, share, torch.float32)


@pytest.mark.parametrize(("dtype", "share"), [(torch.bfloat16, "head"), (torch.bfloat16, "group"), (torch.float16, "head")])
def test_decode_step_in_16_bit(dtype, share):
    _compare((1, 8, 2, 1, 200, 64), "default", share, dtype)


def test_decode_step_without_weights_returns_output_and_prior_only():
    enc, cfg, (query, key, value, codes, norms), visible, scaling, prior = _case((1, 4, 2, 1, 200, 64), "default", "head")
    expected = tiered_step(query, key, value, codes, norms, enc, cfg, visible, scaling, prior, ops=ref, want_prior=True)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    got = tiered_step(on(query), on(key), on(value), on(codes), on(norms), enc.to(DEVICE), cfg, on(visible), scaling,
                      on(prior), ops=tb, want_prior=True, want_weights=False)  # fmt: skip
    assert got.probs is None and got.tiers is None
    assert torch.equal(got.counts.cpu(), expected.counts)
    torch.testing.assert_close(got.output.cpu(), expected.output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.prior.cpu(), expected.prior, rtol=1e-5, atol=1e-6)


def test_bad_settings_are_named():
    z = torch.zeros(1, 1, 1, 16, device=DEVICE)
    c = torch.zeros(1, 1, 1, 1, dtype=torch.int64, device=DEVICE)
    vis = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=DEVICE)
    inputs = StepInputs(z, z, z, c, c, torch.ones(1, 1, 1, device=DEVICE), vis, vis & False, None)
    settings = StepSettings(0.1, 0.2, 64, "head", 0, 0, 0, 4.0, 0.5, 0.25, False, False)
    with pytest.raises(ValueError, match="share='kv'"):
        tb.decode_step(inputs, settings._replace(share="kv"), None)
    with pytest.raises(ValueError, match="spatial_step=2"):
        tb.decode_step(inputs, settings._replace(spatial_step=2), None)
    wide = vis.expand(1, 2, 1, 1)
    with pytest.raises(ValueError, match=r"\[B, 1, T, S\]"):
        tb.decode_step(inputs._replace(visible=wide), settings, None)
