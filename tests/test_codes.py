import pytest
import torch

from dashkv.codes import beta_schedule, num_words, pack_bits, unpack_bits
from dashkv.ops.reference import hamming_distance, popcount64


@pytest.mark.parametrize("bits", [16, 32, 64, 128, 7, 65])
def test_pack_unpack_round_trip(bits):
    codes = torch.rand(3, 2, 5, bits) > 0.5
    words = pack_bits(codes)
    assert words.shape == (3, 2, 5, num_words(bits)) and words.dtype == torch.int64
    assert torch.equal(unpack_bits(words, bits), codes)


def test_pack_sets_bit_63_and_leaves_padding_zero():
    bits = torch.zeros(64, dtype=torch.bool)
    bits[63] = True
    assert pack_bits(bits).item() == -(2**63)
    short = torch.ones(16, dtype=torch.bool)
    assert pack_bits(short).item() == 2**16 - 1


def test_popcount_matches_python_bin_count():
    values = torch.randint(-(2**63), 2**63 - 1, (1000,), dtype=torch.int64)
    values[:3] = torch.tensor([0, -1, -(2**63)])
    expected = [bin(v & (2**64 - 1)).count("1") for v in values.tolist()]
    assert popcount64(values).tolist() == expected


@pytest.mark.parametrize("bits", [32, 64, 128])
@pytest.mark.parametrize("length", [1, 7, 63, 64, 65, 1000])
def test_hamming_equals_bit_by_bit_count(bits, length):
    gen = torch.Generator().manual_seed(length * bits)
    q_bits = torch.rand(2, 6, 3, bits, generator=gen) > 0.5
    k_bits = torch.rand(2, 2, length, bits, generator=gen) > 0.5
    dist = hamming_distance(pack_bits(q_bits), pack_bits(k_bits))
    # query head h reads KV head h // 3
    expected = (q_bits.unsqueeze(3) != k_bits.repeat_interleave(3, dim=1).unsqueeze(2)).sum(-1)
    assert dist.dtype == torch.int32
    assert torch.equal(dist, expected.to(torch.int32))


def test_beta_anneals_from_1_to_10():
    assert beta_schedule(0, 100) == 1.0
    assert beta_schedule(99, 100) == 10.0
    values = [beta_schedule(s, 100) for s in range(100)]
    assert all(a < b for a, b in zip(values, values[1:]))
