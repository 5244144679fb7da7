"""The compiled encoders of a few rows against the encoders' own torch code (the reference)."""

from __future__ import annotations

import pytest
import torch

from dashkv.codes import unpack_bits
from dashkv.encoders import LayerHashEncoder

encode = pytest.importorskip("dashkv.ops.cpu.encode", reason="the cpu backend needs numba")


def _encoder(heads, kv_heads, dim, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    enc = LayerHashEncoder(heads, kv_heads, dim, bits).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        enc.key_center.normal_(generator=gen)
    return enc


def _agree_except_near_zero(fast, slow, projection, bits):
    """Codes equal, bit for bit, wherever the projection is not within float rounding of 0."""
    differ = unpack_bits(fast, bits) != unpack_bits(slow, bits)
    assert not (differ & (projection.abs() > 1e-4)).any()


@pytest.mark.parametrize("bits", [32, 64, 128])
@pytest.mark.parametrize("shape", [(1, 9, 3, 1), (2, 4, 2, 3), (1, 3, 3, 5)])
def test_query_and_key_codes_match_the_encoder(shape, bits):
    batch, heads, kv_heads, tokens = shape
    enc = _encoder(heads, kv_heads, 16, bits, seed=bits + tokens)
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(batch, heads, tokens, 16, generator=gen)
    key = torch.randn(batch, kv_heads, tokens, 16, generator=gen)
    with torch.no_grad():
        _agree_except_near_zero(encode.encode_query(enc, query), enc.encode_query(query), enc.query_projection(query), bits)
        codes, norms = encode.encode_key(enc, key)
        ref_codes, ref_norms = enc.encode_key(key)
        _agree_except_near_zero(codes, ref_codes, enc.key_projection(key), bits)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-6)
    assert codes.dtype == torch.int64 and codes.shape == ref_codes.shape


def test_changed_weights_are_seen_and_large_blocks_use_the_reference():
    enc = _encoder(4, 2, 16, 64)
    query = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = encode.encode_query(enc, query)
        enc.query_skip.neg_()  # in place: the kernels' weight copies must be rebuilt
        enc.query_mlp[-1].weight.neg_()
        enc.query_mlp[-1].bias.neg_()
        after = encode.encode_query(enc, query)
        assert torch.equal(after, enc.encode_query(query)) and not torch.equal(after, before)
        big = torch.randn(1, 4, encode.MAX_ROWS, 16)  # 4 x 64 rows: torch's matrix products
        assert torch.equal(encode.encode_query(enc, big), enc.encode_query(big))
