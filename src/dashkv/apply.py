"""Attach DASH-KV to a model for the length of a ``with`` block, and detach it exactly afterwards.

What ``enable`` changes, and restores on exit: the model's attention implementation (set to the
registered ``"dashkv"`` function) and one forward pre-hook on the model. The hook gives each forward a
cache that keeps key codes and passes the running block's state to the attention function as a
keyword argument of that forward (one state per thread), so nothing outside the model is written.
Weights are never touched.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields, replace

import torch
from torch import nn
from transformers.masking_utils import sdpa_mask

from dashkv import registry
from dashkv.attention import ATTENTION_NAME, RUNTIME_KWARG, DashKVRuntime, dashkv_attention_forward
from dashkv.cache import DashKVCache, upgrade_cache
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders
from dashkv.models import attention_modules, check_supported, sliding_windows
from dashkv.stats import TierStats

logger = logging.getLogger(__name__)


def register_attention() -> None:
    """Register the ``"dashkv"`` attention and mask functions with transformers (idempotent)."""
    # the sdpa mask: boolean [B, 1, T, S], or None when the pattern is plain causal
    registry.register_attention(ATTENTION_NAME, dashkv_attention_forward, sdpa_mask)


class _SharedStats(TierStats):
    """The block's :class:`TierStats`, added to by every thread that runs the model inside it."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def record(self, layer, tiers) -> None:
        with self._lock:
            super().record(layer, tiers)

    def record_counts(self, layer, counts) -> None:
        with self._lock:
            super().record_counts(layer, counts)

    def record_dense(self, layer) -> None:
        with self._lock:
            super().record_dense(layer)


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _compiled(model: nn.Module) -> str | None:
    """How ``model`` was put through ``torch.compile``, or None (read from attributes: no dynamo import)."""
    if getattr(model, "_orig_mod", None) is not None:
        return "the model is a torch.compile wrapper"
    if getattr(model, "_compiled_call_impl", None) is not None:
        return "model.compile() was called"
    if hasattr(getattr(model, "forward", None), "_torchdynamo_orig_callable"):
        return "model.forward is compiled with torch.compile"
    return None


def _refuse_compiled(model: nn.Module) -> None:
    how = _compiled(model)
    if how is not None:
        raise ValueError(f"{how}: DASH-KV's kernels and per-forward cache cannot run inside a compiled graph; "
                         "enable DASH-KV on the uncompiled model (compile it after the block if you like)")  # fmt: skip


def _input_length(args: tuple, kwargs: dict) -> int:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        embeds = kwargs.get("inputs_embeds")
        return 0 if embeds is None else embeds.shape[1]
    return ids.shape[-1]


def _cache_hook(encoders: HashEncoders, config: DashKVConfig, stats: TierStats, model: nn.Module,
                beyond_positions: bool):  # fmt: skip
    dense = config.dense_layers
    sliding = sliding_windows(model.config)  # {layer: window}: left to transformers, cache layers included
    limit = getattr(_text_config(model), "max_position_embeddings", None)
    threads = threading.local()  # the runtime of each thread generating inside this block
    warned = set()

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        _refuse_compiled(module)
        if kwargs.get("output_attentions") or getattr(module.config, "output_attentions", False):
            raise ValueError("output_attentions=True: DASH-KV's attention returns no weights (most keys are never "
                             "scored); leave the dashkv.enable block to get them from full attention")  # fmt: skip
        cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(model.config, "use_cache", True)
        if cache is None and use_cache:
            cache = DashKVCache(encoders, dense, config=model.config)
            kwargs["past_key_values"] = cache
        elif cache is not None:  # a plain DynamicCache, or a DashKVCache made without (these) encoders
            upgrade_cache(cache, encoders, dense, sliding)
        elif config.prefill == "dense" and "use_cache" not in warned:
            warned.add("use_cache")
            logger.warning("use_cache=False under dashkv.enable: every forward is a prefill over an empty cache, "
                           "which prefill='dense' runs as full attention, so nothing runs tiered; generate with "
                           "use_cache=True (or use prefill='tiered')")  # fmt: skip
        if limit is not None and not beyond_positions:
            past = cache.get_seq_length() if cache is not None else 0
            end = past + _input_length(args, kwargs)
            if end > limit:
                raise ValueError(f"input_ids: the sequence reaches {end} tokens ({past} cached + "
                                 f"{end - past} new) but the model has max_position_embeddings={limit}; shorten the "
                                 "prompt or max_new_tokens, or pass allow_beyond_positions=True to dashkv.enable")  # fmt: skip
        runtime = getattr(threads, "runtime", None)
        if runtime is None:
            runtime = threads.runtime = DashKVRuntime(encoders, config, stats, sliding=frozenset(sliding))
        runtime.begin_forward(cache)
        kwargs[RUNTIME_KWARG] = runtime
        return args, kwargs

    hook.dashkv_enabled = True  # marks the model as enabled (see _validate)
    return hook


def _check_layer_kinds(model: nn.Module) -> None:
    """Raise ``ValueError`` unless the layers are full causal attention, or sliding-window layers (which
    are left to transformers) beside at least one full layer."""
    text = _text_config(model)
    kinds = list(getattr(text, "layer_types", None) or [])
    left = ("full_attention", "sliding_attention", "chunked_attention")
    other = sorted({k for k in kinds if k not in left})
    if other:
        layers = [i for i, k in enumerate(kinds) if k not in left]
        raise ValueError(f"layer_types: layers {layers[:8]}{'...' if len(layers) > 8 else ''} are {other}; "
                         "DASH-KV serves full causal attention layers (sliding ones run as they are)")  # fmt: skip
    if kinds and len(sliding_windows(model.config)) == len(kinds):
        raise ValueError("layer_types: every layer attends to a sliding window; DASH-KV serves full "
                         "attention layers and this model has none")  # fmt: skip
    window = getattr(text, "sliding_window", None)
    if getattr(text, "model_type", None) == "mistral" and window is not None:
        raise ValueError(f"sliding_window={window}: this Mistral attends to a sliding window, which DASH-KV does "
                         "not serve; if every context is shorter than the window, set "
                         "model.config.sliding_window = None first")  # fmt: skip


def _checked_encoders(encoders: HashEncoders) -> HashEncoders:
    """``encoders`` as float32 (a copy when cast), after refusing non-finite or non-float weights.

    The verdict is kept on the encoders until a tensor changes (its storage or version counter): the
    scan of every weight cost ~27 ms, paid by each ``enable`` of a loop of short generations."""
    tensors = list(itertools.chain(encoders.parameters(), encoders.buffers()))
    stamp = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    held = getattr(encoders, "_dashkv_checked", None)
    if held is not None and held[0] == stamp:
        return held[1]
    checked = _scan_encoders(encoders)
    encoders._dashkv_checked = (stamp, checked)
    return checked


def _scan_encoders(encoders: HashEncoders) -> HashEncoders:
    dtypes = set()
    for name, tensor in encoders.state_dict().items():
        if not tensor.is_floating_point():
            raise ValueError(f"encoders: {name} is {tensor.dtype}; encoders hold float weights (float32, "
                             "float16, bfloat16)")  # fmt: skip
        dtypes.add(tensor.dtype)
        if not torch.isfinite(tensor).all():
            raise ValueError(f"encoders: {name} holds non-finite values (NaN or inf); its codes would be "
                             "meaningless")  # fmt: skip
    if dtypes != {torch.float32}:  # they compute in float32: cast a copy, the caller's stay as they are
        logger.info("encoders in %s: running a float32 copy", sorted(map(str, dtypes)))
        encoders = copy.deepcopy(encoders).float()
    return encoders


def _validate(model: nn.Module, encoders: HashEncoders, config: DashKVConfig) -> None:
    encoders.check_compatible(model)
    config.check_code_length(encoders.bits)
    layers = encoders.shape["num_layers"]
    bad = [i for i in config.dense_layers if i >= layers]
    if bad:
        raise ValueError(f"dense_layers={config.dense_layers} names layers {bad}; the model has layers 0..{layers - 1}")
    _refuse_compiled(model)
    _check_layer_kinds(model)
    attention_modules(model)
    if any(getattr(h, "dashkv_enabled", False) for h in model._forward_pre_hooks.values()):
        raise ValueError("DASH-KV is already enabled on this model; leave the outer `with dashkv.enable(...)` first")


def _resolve(model: nn.Module, encoders, config) -> tuple[HashEncoders, DashKVConfig]:
    """The encoders and config ``enable`` was given, as objects (paths loaded, mappings built), the config
    completed by the encoders (their dense layers joined; their sharing where the config leaves it open)."""
    if encoders is None:
        from dashkv.shipped import shipped_encoders

        encoders = shipped_encoders(model)
    elif isinstance(encoders, (str, os.PathLike)):
        encoders = HashEncoders.from_pretrained(encoders)
    elif not isinstance(encoders, HashEncoders):
        raise TypeError(f"encoders={type(encoders).__name__} is not allowed; encoders must be HashEncoders, the "
                        "path of a saved encoders directory, or None (the shipped ones)")  # fmt: skip
    if config is None:
        config = DashKVConfig(bits=encoders.bits)
    elif isinstance(config, Mapping):
        known = {f.name for f in fields(DashKVConfig)}
        unknown = sorted(str(k) for k in config if k not in known)
        if unknown:
            raise ValueError(f"config: unknown settings {unknown}; DashKVConfig has {sorted(known)}")
        config = DashKVConfig(**{"bits": encoders.bits, **config})
    elif not isinstance(config, DashKVConfig):
        raise TypeError(f"config={type(config).__name__} is not allowed; config must be DashKVConfig, a mapping "
                        "of its settings, or None (the defaults)")  # fmt: skip
    if not set(encoders.dense_layers) <= set(config.dense_layers):  # layers the encoders do not serve stay exact
        config = replace(config, dense_layers=(*config.dense_layers, *encoders.dense_layers))
    if config.share is None:  # left open: the sharing the encoders were measured with
        config = replace(config, share=encoders.share)
    return encoders, config


@contextmanager
def enable(
    model: nn.Module,
    encoders: HashEncoders | str | os.PathLike | None = None,
    config: DashKVConfig | Mapping | None = None,
    *,
    allow_beyond_positions: bool = False,
) -> Iterator[TierStats]:
    """Run ``model`` with DASH-KV attention inside the block.

    Parameters
    ----------
    model : a transformers causal LM (Llama, Qwen2, Qwen3, Mistral, Gemma-3 families), not compiled;
        DASH-KV runs on its full-attention layers, sliding-window layers run as transformers runs them
    encoders : HashEncoders, path or None
        A directory saved by ``HashEncoders.save_pretrained`` is loaded; ``None`` takes the encoders
        shipped for this model, if any. Encoders in float16/bfloat16 run as a float32 copy.
    config : DashKVConfig, mapping or None
        A mapping is passed to ``DashKVConfig`` (``bits`` defaults to the encoders'); ``None`` uses the
        defaults, with ``bits`` taken from the encoders.
    allow_beyond_positions : bool
        Run sequences longer than the model's ``max_position_embeddings`` (refused by default: the
        model was never trained there).

    Inside the block a forward with ``output_attentions=True`` or a compiled forward is refused, and
    ``use_cache=False`` with ``prefill="dense"`` is warned about once (it runs nothing tiered).

    Yields
    ------
    TierStats -- per-layer tier fractions of everything run inside the block (all threads).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__} is not allowed; model must be a transformers causal LM "
                        "(dashkv.load_model gives one)")  # fmt: skip
    if not isinstance(allow_beyond_positions, bool):
        raise TypeError(f"allow_beyond_positions={allow_beyond_positions!r} is not allowed; it must be True or False")
    check_supported(model)
    encoders, config = _resolve(model, encoders, config)
    _validate(model, encoders, config)
    encoders = _checked_encoders(encoders)
    device = next(model.parameters()).device
    if any(t.device != device for t in itertools.chain(encoders.parameters(), encoders.buffers())):
        encoders = encoders.to(device)
    stats = _SharedStats()
    register_attention()
    previous = model.config._attn_implementation
    hook = model.register_forward_pre_hook(
        _cache_hook(encoders, config, stats, model, allow_beyond_positions), with_kwargs=True
    )
    try:
        model.set_attn_implementation(ATTENTION_NAME)
        yield stats
    finally:
        hook.remove()
        model.set_attn_implementation(previous)
