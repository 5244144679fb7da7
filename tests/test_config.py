import pytest

from dashkv import DashKVConfig


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(bits=48), "bits"),
        (dict(bits=256), "bits"),
        (dict(high=-0.1), "high"),
        (dict(high=1.5), "high"),
        (dict(mid=2.0), "mid"),
        (dict(high=0.7, mid=0.4), "high + mid"),
        (dict(window=0), "window"),
        (dict(sinks=-1), "sinks"),
        (dict(vote_fraction=0.0), "vote_fraction"),
        (dict(spatial_discount=2.0), "spatial_discount"),
        (dict(momentum_decay=1.0), "momentum_decay"),
        (dict(prefill="sparse"), "prefill"),
        (dict(backend="cuda"), "backend"),
        (dict(dense_layers=(-1,)), "dense_layers"),
    ],
)
def test_bad_config_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name.replace("+", r"\+")):
        DashKVConfig(**kwargs)


@pytest.mark.parametrize("bits", [16, 32, 64, 128])
def test_supported_bits_and_full_precision_are_valid(bits):
    assert DashKVConfig(bits=bits, high=1.0, mid=0.0).high == 1.0
    assert DashKVConfig.full(bits=bits).mid == 0.0


def test_encoders_and_config_share_one_default_code_length(tiny_qwen2):
    from dashkv import HashEncoders
    from dashkv.config import DEFAULT_BITS

    model = tiny_qwen2
    assert DashKVConfig().bits == HashEncoders.random(model).bits == DEFAULT_BITS


def test_encoders_and_config_of_different_code_lengths_fail_with_one_clear_error(tiny_qwen2):
    import dashkv
    from dashkv import HashEncoders
    from dashkv.config import ConfigError

    model = tiny_qwen2
    encoders = HashEncoders.random(model, bits=64)
    with pytest.raises(ConfigError, match=r"config\.bits=128 but the encoders produce 64-bit codes") as error:
        with dashkv.enable(model, encoders, DashKVConfig()):
            pass
    assert error.value.field == "bits"
    with dashkv.enable(model, encoders, {"high": 0.1}):  # a mapping takes the encoders' length
        pass
