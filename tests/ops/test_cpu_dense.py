"""The CPU backend's dense-layer attention against the reference (full attention over the visible keys)."""

from __future__ import annotations

import pytest
import torch

from dashkv.ops import reference as ref

cpu = pytest.importorskip("dashkv.ops.cpu", reason="the cpu backend needs numba")
import dashkv.ops.cpu.dense  # noqa: E402  (the fixture shrinks its CHUNK)

# (batch, heads, kv heads, tokens, keys, head dim)
CASES = [
    (1, 1, 1, 1, 1, 8),
    (2, 3, 1, 5, 7, 16),  # GQA 3, a block of queries
    (1, 4, 1, 1, 3000, 256),  # Gemma-3-270M's decode shape, several chunks
    (2, 9, 3, 1, 1025, 64),  # SmolLM2's, one key past a chunk
    (2, 6, 2, 2, 300, 32),
]
IDS = [f"B{b}H{h}kv{kv}T{t}S{s}D{d}" for b, h, kv, t, s, d in CASES]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}  # fmt: skip
PROBS_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(params=[None, 16], ids=["chunk=default", "chunk=16"])
def chunk(request, monkeypatch):
    """The default chunk size and a tiny one, so that the partials cross many chunks."""
    if request.param is not None:
        monkeypatch.setattr(cpu.dense, "CHUNK", request.param)
    return request.param


def _case(seed, batch, heads, kv_heads, tokens, keys, dim, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, keys, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, keys, dim, generator=gen).to(dtype)
    pos = torch.arange(keys)
    qpos = keys - tokens + torch.arange(tokens)
    visible = (pos.view(1, -1) <= qpos.view(-1, 1)).expand(batch, 1, tokens, keys).clone()
    if batch > 1:  # left padding in batch row 1, random holes
        visible[1, ..., : keys // 5] = False
    visible &= torch.rand(batch, 1, tokens, keys, generator=gen) > 0.1
    visible[..., -1] = True  # every query sees itself
    return q, k, v, visible


@pytest.mark.parametrize("want_probs", [False, True], ids=["probs=off", "probs=on"])
@pytest.mark.parametrize("shape", CASES, ids=IDS)
def test_dense_attention_fp32(shape, want_probs, chunk):
    q, k, v, visible = _case(3, *shape)
    scaling = shape[-1] ** -0.5
    out, probs = cpu.dense_attention(q, k, v, visible, scaling, want_probs)
    out_ref, probs_ref = ref.dense_attention(q, k, v, visible, scaling, want_probs)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out, out_ref, **TOL[torch.float32])
    if want_probs:
        assert probs.dtype == torch.float32
        torch.testing.assert_close(probs, probs_ref, **PROBS_TOL)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:3]))
    else:
        assert probs is None and probs_ref is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dense_attention_half_precision(dtype):
    q, k, v, visible = _case(4, 2, 8, 2, 3, 1000, 64, dtype)
    v[:, :, ::5, :4] = torch.tensor([0.0, -0.0, 3.0e-6, -6.0e4]).to(dtype)  # zeros, a subnormal, a large value
    out, probs = cpu.dense_attention(q, k, v, visible, 0.125, True)
    out_ref, probs_ref = ref.dense_attention(q, k, v, visible, 0.125, True)
    assert out.dtype == dtype
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    torch.testing.assert_close(probs, probs_ref, **PROBS_TOL)


def test_dense_attention_reads_a_growing_cache_in_place(chunk):
    """K and V as a cache hands them out: prefix views of buffers with room past ``S``."""
    q, k, v, visible = _case(5, 1, 4, 2, 1, 500, 32)
    kbuf, vbuf = torch.zeros(1, 2, 800, 32), torch.zeros(1, 2, 800, 32)
    kbuf[:, :, :500], vbuf[:, :, :500] = k, v
    got = cpu.dense_attention(q, kbuf[:, :, :500], vbuf[:, :, :500], visible, 0.2, True)
    expected = ref.dense_attention(q, k, v, visible, 0.2, True)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **PROBS_TOL)


def test_rows_without_keys_are_nan_and_no_keys_is_empty():
    q, k, v, visible = _case(6, 2, 4, 2, 3, 300, 32)
    visible[1, 0, 2] = False  # this token sees nothing
    out, probs = cpu.dense_attention(q, k, v, visible, 0.2, True)
    out_ref, probs_ref = ref.dense_attention(q, k, v, visible, 0.2, True)
    assert out[1, :, 2].isnan().all() and probs[1, :, 2].isnan().all()
    torch.testing.assert_close(out, out_ref, equal_nan=True, **TOL[torch.float32])
    torch.testing.assert_close(probs, probs_ref, equal_nan=True, **PROBS_TOL)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 0, 8), torch.randn(1, 1, 0, 8)
    visible = torch.ones(1, 1, 1, 0, dtype=torch.bool)
    for got, expected in zip(cpu.dense_attention(q, k, v, visible, 0.3, True),
                             ref.dense_attention(q, k, v, visible, 0.3, True)):  # fmt: skip
        torch.testing.assert_close(got, expected)


def test_reference_is_full_attention():
    """The reference itself: equal to torch's SDPA over the same mask."""
    q, k, v, visible = _case(7, 2, 6, 2, 4, 200, 16)
    out, _ = ref.dense_attention(q, k, v, visible, 0.25)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)
