"""The Triton backend's single ops against the reference: distances, selections and tiers exactly equal;
tiered attention and key codes within float rounding.

On a GPU the kernels run compiled on CUDA tensors (``pytest -m cuda``); without one, through Triton's
interpreter on CPU tensors (``tests/conftest.py`` switches it on), in the default test run. The
interpreter is slow: cases are few and small, chosen to cover awkward lengths, GQA ratios, 1 and 2
code words, batch 2 and several chunks.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the triton backend needs triton (pip install 'dashkv[gpu]')")

from dashkv.codes import unpack_bits  # noqa: E402
from dashkv.encoders import LayerHashEncoder  # noqa: E402
from dashkv.ops import reference as ref  # noqa: E402
from dashkv.ops import triton as tb  # noqa: E402
from dashkv.ops.triton import common  # noqa: E402

pytestmark = pytest.mark.cuda
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 128 keys: several chunks (tie bases, split-K merge) at lengths the interpreter affords."""
    monkeypatch.setattr(common, "CHUNK", 128)


def _codes(gen, shape, bits):
    words = -(-bits // 64)
    codes = torch.randint(-(2**62), 2**62, (*shape, words), generator=gen) * 2 + torch.randint(0, 2, (*shape, words), generator=gen)
    if bits % 64:
        codes[..., -1] &= (1 << (bits % 64)) - 1
    return codes.to(DEVICE)


# (batch, heads, kv heads, tokens, keys, bits): GQA 1 / 3 / 4 / 8, awkward lengths, 1 and 2 words
HAMMING = [(2, 3, 3, 1, 1, 64), (1, 9, 3, 2, 7, 32), (2, 4, 1, 1, 63, 128), (1, 8, 1, 1, 65, 64),
           (1, 2, 2, 3, 1000, 96), (1, 4, 4, 1, 4097, 64)]  # fmt: skip


@pytest.mark.parametrize("shape", HAMMING, ids=[f"B{b}H{h}kv{k}T{t}S{s}R{r}" for b, h, k, t, s, r in HAMMING])
def test_hamming_distance_equals_the_reference(shape):
    batch, heads, kv_heads, tokens, keys, bits = shape
    gen = torch.Generator().manual_seed(keys)
    qc, kc = _codes(gen, (batch, heads, tokens), bits), _codes(gen, (batch, kv_heads, keys), bits)
    got = tb.hamming_distance(qc, kc)
    assert got.dtype == torch.int32 and got.device.type == DEVICE.type
    assert torch.equal(got.cpu(), ref.hamming_distance(qc.cpu(), kc.cpu()))


def _ties(gen, shape, lo, hi):
    """Distances from few values (many ties) over ``[lo, hi]``."""
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int32)


@pytest.mark.parametrize("keys", [1, 7, 65, 1000, 4097])
def test_select_smallest_equals_the_reference(keys):
    gen = torch.Generator().manual_seed(keys)
    dist = _ties(gen, (2, 3, 2, keys), -4, 12)
    eligible = torch.rand(2, 1, 2, keys, generator=gen) > 0.25
    k = torch.tensor([[[0, 1], [keys // 3, keys]], [[keys + 5, 2], [3, keys // 2]]])[:, :1].expand(2, 3, 2).clone()
    k[1, 2] = torch.tensor([keys // 7, 1])
    got = tb.select_smallest(dist.to(DEVICE), eligible.to(DEVICE), k.to(DEVICE), -4, 12)
    expected = ref.select_smallest(dist, eligible, k, -4, 12)
    assert got.dtype == torch.bool and torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("keys", [7, 63, 1000])
def test_assign_tiers_equals_the_reference(keys, small_chunks):
    gen = torch.Generator().manual_seed(keys + 1)
    dist = _ties(gen, (2, 2, 2, keys), -8, 64)
    visible = torch.rand(2, 1, 2, keys, generator=gen) > 0.1
    always = torch.zeros(2, 1, 2, keys, dtype=torch.bool)
    always[..., :2] = True
    always[..., -3:] = True
    n = (visible & ~always).sum(-1)
    k_high, k_mid = ref.budget_counts(n, 0.1), ref.budget_counts(n, 0.3) - ref.budget_counts(n, 0.1)
    args = (dist, visible, always, k_high, k_mid, -8, 64)
    got = tb.assign_tiers(*(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args))
    assert got.dtype == torch.int8 and torch.equal(got.cpu(), ref.assign_tiers(*args))


@pytest.mark.parametrize("with_mid", [False, True], ids=["high-only", "high+mid"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 2, 300, 64), (1, 3, 1, 1, 65, 128)], ids=["B2H4kv2T2S300", "B1H3kv1S65"])
def test_tiered_attention_matches_the_reference(shape, with_mid, small_chunks):
    batch, heads, kv_heads, tokens, keys, bits = shape
    gen = torch.Generator().manual_seed(keys + with_mid)
    dim = 16
    query = torch.randn(batch, heads, tokens, dim, generator=gen)
    key = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    value = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    tiers = torch.randint(-1, 3, (batch, heads, tokens, keys), generator=gen, dtype=torch.int8)
    tiers[..., 0] = ref.HIGH  # every row attends somewhere
    mid = None
    if with_mid:
        qc, kc = _codes(gen, (batch, heads, tokens), bits).cpu(), _codes(gen, (batch, kv_heads, keys), bits).cpu()
        mid = ref.MidTierInputs(
            ref.hamming_distance(qc, kc), qc, kc, bits, query.norm(dim=-1), torch.rand(batch, kv_heads, keys, generator=gen),
            torch.randn(batch, heads, tokens, generator=gen), torch.rand(heads, generator=gen) + 0.5,
            torch.randn(heads, generator=gen), torch.randn(heads, bits, generator=gen) * 0.05,
        )  # fmt: skip
    expected, expected_probs = ref.tiered_attention(query, key, value, tiers, dim**-0.5, mid)
    on = lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t  # noqa: E731
    got, probs = tb.tiered_attention(on(query), on(key), on(value), on(tiers), dim**-0.5,
                                     ref.MidTierInputs(*map(on, mid)) if mid is not None else None)  # fmt: skip
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs.cpu(), expected_probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [32, 64, 128])
def test_key_codes_match_the_encoder(bits, dtype):
    gen = torch.Generator().manual_seed(bits)
    enc = LayerHashEncoder(4, 2, 16, bits).eval()
    with torch.no_grad():
        enc.key_proj.normal_(generator=gen)
        enc.key_center.normal_(generator=gen)
    key = torch.randn(2, 2, 37, 16, generator=gen).to(dtype)
    codes, norms = tb.encode_key(enc, key.to(DEVICE))
    ref_codes, ref_norms = enc.encode_key(key)
    differ = unpack_bits(codes.cpu(), bits) != unpack_bits(ref_codes, bits)
    assert not (differ & (enc.key_projection(key).abs() > 1e-4)).any()  # equal but within rounding of 0
    assert codes.dtype == torch.int64 and codes.shape == ref_codes.shape
    torch.testing.assert_close(norms.cpu(), ref_norms, rtol=1e-5, atol=1e-5)


def test_cpu_tensors_are_refused_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    codes = torch.zeros(1, 1, 1, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="query_codes on cpu"):
        tb.hamming_distance(codes, codes)
    from dashkv.ops.dispatch import get_backend

    with pytest.raises(ValueError, match="backend='triton' takes CUDA tensors"):
        get_backend("triton", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_triton_on_a_gpu():
    from dashkv.ops.dispatch import get_backend

    assert get_backend("auto", torch.device("cuda")) is tb
    assert get_backend("triton", torch.device("cuda")) is tb
