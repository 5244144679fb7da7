import torch

from dashkv.baselines.kivi import KIVILayer, quantize_keys, quantize_values


def test_keys_per_channel_values_per_token_two_bits():
    torch.manual_seed(0)
    keys = torch.randn(1, 2, 64, 16) * torch.linspace(0.1, 10, 16)  # channels of very different ranges
    qk = quantize_keys(keys, bits=2, group_size=32)
    for group in range(2):
        block = qk[0, 0, group * 32 : (group + 1) * 32]
        for channel in range(16):  # one zero point and scale per channel of a token group: <= 4 levels
            assert block[:, channel].unique().numel() <= 4
    # per-channel scales: the small channels keep a small error despite the large ones
    assert (qk - keys)[..., 0].abs().max() < 0.1
    values = torch.randn(1, 2, 5, 64)
    qv = quantize_values(values, bits=2, group_size=32)
    for token in range(5):
        assert qv[0, 1, token, :32].unique().numel() <= 4
    err = (qv - values).abs()
    assert err.max() <= (values.amax() - values.amin()) / 3 / 2 + 1e-5  # at most half a level


def test_residual_tail_stays_full_precision_and_spills_in_groups():
    torch.manual_seed(0)
    layer = KIVILayer(bits=2, group_size=8, residual=16)
    keys, values = torch.randn(1, 1, 50, 8), torch.randn(1, 1, 50, 8)
    k, v = layer.update(keys, values)
    # 50 - 16 = 34 -> 32 tokens quantized, 18 in full precision
    assert layer.full_precision == 18
    assert torch.equal(k[..., 32:, :], keys[..., 32:, :]) and torch.equal(v[..., 32:, :], values[..., 32:, :])
    assert not torch.equal(k[..., :32, :], keys[..., :32, :])
    more = torch.randn(1, 1, 6, 8)
    k, _ = layer.update(more, more)  # 24 in full precision -> 8 spill
    assert layer.full_precision == 16 and k.shape[-2] == 56
    assert torch.equal(k[..., 40:, :], torch.cat([keys[..., 40:, :], more], dim=-2))
