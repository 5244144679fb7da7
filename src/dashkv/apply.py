"""Attach DASH-KV to a model for the length of a ``with`` block, and detach it exactly afterwards.

What ``enable`` changes, and restores on exit: the model's attention implementation (set to the
registered ``"dashkv"`` function), one forward pre-hook on the model (it gives each forward a cache that
keeps key codes), and the registry entry of each attention module. Weights are never touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from dashkv.attention import ACTIVE, ATTENTION_NAME, DashKVRuntime, dashkv_attention_forward
from dashkv.cache import DashKVCache, upgrade_cache
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders
from dashkv.models import attention_modules, check_supported
from dashkv.stats import TierStats


def register_attention() -> None:
    """Register the ``"dashkv"`` attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, dashkv_attention_forward)
    # the sdpa mask: boolean [B, 1, T, S], or None when the pattern is plain causal
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def _cache_hook(runtime: DashKVRuntime, model: nn.Module):
    dense = runtime.config.dense_layers

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(model.config, "use_cache", True)
        if cache is None and use_cache:
            cache = DashKVCache(runtime.encoders, dense)
            kwargs["past_key_values"] = cache
        elif cache is not None:  # a plain DynamicCache, or a DashKVCache made without (these) encoders
            upgrade_cache(cache, runtime.encoders, dense)
        runtime.begin_forward(cache)
        return args, kwargs

    return hook


def _validate(model: nn.Module, encoders: HashEncoders, config: DashKVConfig) -> None:
    encoders.check_compatible(model)
    if encoders.bits != config.bits:
        raise ValueError(f"config.bits={config.bits} but the encoders produce {encoders.bits}-bit codes; make them equal")
    layers = encoders.shape["num_layers"]
    bad = [i for i in config.dense_layers if i >= layers]
    if bad:
        raise ValueError(f"dense_layers={config.dense_layers} names layers {bad}; the model has layers 0..{layers - 1}")
    if any(m in ACTIVE for m in attention_modules(model)):
        raise ValueError("DASH-KV is already enabled on this model; leave the outer `with dashkv.enable(...)` first")


@contextmanager
def enable(
    model: nn.Module, encoders: HashEncoders | None = None, config: DashKVConfig | None = None
) -> Iterator[TierStats]:
    """Run ``model`` with DASH-KV attention inside the block.

    Parameters
    ----------
    model : a transformers causal LM (Llama, Qwen2, Qwen3, Mistral families)
    encoders : HashEncoders or None
        ``None`` takes the encoders shipped for this model, if any.
    config : DashKVConfig or None
        ``None`` uses the defaults, with ``bits`` taken from the encoders.

    Yields
    ------
    TierStats -- per-layer tier fractions of everything run inside the block.
    """
    check_supported(model)
    if encoders is None:
        from dashkv.shipped import shipped_encoders

        encoders = shipped_encoders(model)
    config = config if config is not None else DashKVConfig(bits=encoders.bits)
    _validate(model, encoders, config)
    device = next(model.parameters()).device
    encoders = encoders.to(device)
    runtime = DashKVRuntime(encoders, config)
    register_attention()
    modules = attention_modules(model)
    previous = model.config._attn_implementation
    hook = model.register_forward_pre_hook(_cache_hook(runtime, model), with_kwargs=True)
    try:
        for module in modules:
            ACTIVE[module] = runtime
        model.set_attn_implementation(ATTENTION_NAME)
        yield runtime.stats
    finally:
        hook.remove()
        for module in modules:
            ACTIVE.pop(module, None)
        model.set_attn_implementation(previous)
        runtime.begin_forward(None)
