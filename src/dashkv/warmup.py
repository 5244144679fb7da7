"""Compile the numba CPU kernels of DASH-KV ahead of time, and notice when a call is about to compile.

numba compiles a kernel at its first call with new argument types; with ``cache=True`` (every kernel
in :mod:`dashkv.ops.cpu`) the machine code is kept on disk (``ops/cpu/__pycache__``, or numba's cache
directory where the package is read-only) and later processes load it instead. Without a warm-up a
user's first ``generate`` under :func:`dashkv.enable` waits for that compilation.

:func:`warmup` runs the real inference path -- a dense prefill, a question block and decode tokens
under :func:`dashkv.enable` -- on a tiny random model with the default model's attention geometry, once
per config variant that reaches a different kernel or argument types, so that each kernel the path
calls is compiled and cached. The kernels are chosen by the path itself, not by a list: a backend
that calls other kernels gets those compiled.

:func:`warn_if_cold` is for the backend's first call: it logs :data:`COLD_MESSAGE` once per process
when the on-disk cache of the decode kernels is empty or stale (:func:`cold_kernels`).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pkgutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

COLD_MESSAGE = "compiling DASH-KV CPU kernels once; run `dashkv warmup` ahead of time"

DECODE_KERNELS = (
    "step.step_kernel",
    "attend.attn_tiers_kernel",
    "attend.merge_kernel",
    "attend.scale_probs",
    "dense.dense_kernel",  # the step of a layer left to full attention (``dense_layers``)
    "dense.dense_merge",
    "dense.dense_scale_probs",
    "tables.byte_tables",
    "select.block_distance_kernel",
    "encode.key_codes_kernel",  # a block prefill codes a chunk's few new keys from Python
)
"""The kernels the decode path (and the block prefill) calls from Python (modules of
:mod:`dashkv.ops.cpu`); kernels they call are compiled (and cached) with them."""

GEOMETRY = dict(head_dim=64, num_attention_heads=9, num_key_value_heads=3)
"""Attention geometry of the default model (SmolLM2-135M): D = 64, 9 query heads, 3 KV heads."""

_warned = False


@dataclass
class WarmupReport:
    """What :func:`warmup` did: ``seconds`` in all, the config variants run, and the kernels compiled in
    this call (``compiled``: no usable on-disk version) or loaded from numba's cache (``loaded``)."""

    seconds: float
    variants: list[str] = field(default_factory=list)
    compiled: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)


def cpu_kernels() -> dict[str, object]:
    """Every numba dispatcher defined in the modules of :mod:`dashkv.ops.cpu`, by ``module.name``.

    Raises
    ------
    ImportError
        Where numba (or its LLVM) cannot be imported.
    """
    from numba.core.dispatcher import Dispatcher

    from dashkv.ops import cpu

    found: dict[str, object] = {}
    for info in pkgutil.iter_modules(cpu.__path__):
        module = importlib.import_module(f"{cpu.__name__}.{info.name}")
        for name, value in vars(module).items():
            # imported names appear in several modules: keep the one where the kernel is defined
            if isinstance(value, Dispatcher) and value.py_func.__module__ == module.__name__:
                found[kernel_name(value)] = value
    return found


def kernel_name(dispatcher) -> str:
    """``module.function`` of a dispatcher, the module without its package (``fused.attend_kernel``)."""
    func = dispatcher.py_func
    return f"{func.__module__.rsplit('.', 1)[-1]}.{func.__qualname__}"


def decode_kernels() -> dict[str, object]:
    """The dispatchers named in :data:`DECODE_KERNELS` (names that do not resolve are left out)."""
    kernels = cpu_kernels()
    return {name: kernels[name] for name in DECODE_KERNELS if name in kernels}


def _has_cached_version(dispatcher) -> bool:
    """Whether numba's on-disk cache holds a version of ``dispatcher`` compiled from its current source
    (file stamp and bytecode) for this CPU and numba version, for any argument types.

    Reads numba's cache index the way ``numba.core.caching`` does (private API, as of numba 0.68;
    :func:`cold_kernels` treats any failure here as warm): an index whose stamp does not match the
    source loads as empty.
    """
    cache = dispatcher._cache
    index = cache._cache_file._load_index()
    # an index key is (signature, target CPU, bytecode hashes); the last two must be this process's
    current = cache._index_key(None, dispatcher.targetctx.codegen())[1:]
    return any(key[1:] == current for key in index)


def cold_kernels(kernels: Iterable[object] | None = None) -> list[str]:
    """Names of the kernels whose next call would compile: no on-disk version from their current source
    for this machine, and none compiled in this process yet.

    Parameters
    ----------
    kernels : numba dispatchers, or None for :func:`decode_kernels`

    A kernel with a cached version may still compile for argument types it has not met (a bfloat16
    cache where only float32 was warmed up); this check catches a fresh install, an edited source
    file, a new numba and another CPU. It never raises: where numba's cache cannot be read, kernels
    count as warm (no message rather than a wrong one).
    """
    try:
        chosen = list(decode_kernels().values()) if kernels is None else list(kernels)
    except ImportError:
        return []
    cold = []
    for dispatcher in chosen:
        if dispatcher.signatures:  # compiled or loaded in this process already
            continue
        try:
            warm = _has_cached_version(dispatcher)
        except Exception:  # noqa: BLE001 - numba internals moved: say nothing rather than fail inference
            warm = True
        if not warm:
            cold.append(kernel_name(dispatcher))
    return cold


def warn_if_cold(kernels: Iterable[object] | None = None) -> bool:
    """Log :data:`COLD_MESSAGE` (a warning) once per process if a kernel is about to compile.

    Meant for the first call of the CPU backend, before it runs its kernels. After the first check
    (cold or not) it does nothing and returns False, so it costs one attribute read per call.

    Parameters
    ----------
    kernels : numba dispatchers the caller is about to run, or None for :func:`decode_kernels`

    Returns
    -------
    bool -- whether this call logged the message.
    """
    global _warned
    if _warned:
        return False
    _warned = True
    cold = cold_kernels(kernels)
    if cold:
        logger.warning("%s (not compiled yet: %s)", COLD_MESSAGE, ", ".join(cold))
    return bool(cold)


def tiny_model(num_layers: int = 3, vocab_size: int = 128, dtype: torch.dtype = torch.float32):
    """A random Llama with the default model's attention geometry (:data:`GEOMETRY`), built from a local
    config (no download). Layer 0 is dense in the default config, so 3 layers give two tiered ones and
    the cross-layer momentum a previous layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads, dim = GEOMETRY["num_attention_heads"], GEOMETRY["head_dim"]
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=heads * dim, intermediate_size=64, num_hidden_layers=num_layers,
        max_position_embeddings=4096, attn_implementation="sdpa", **GEOMETRY,
    )  # fmt: skip
    with torch.random.fork_rng():  # seeded weights without touching the caller's random state
        torch.manual_seed(0)
        return LlamaForCausalLM(config).to(dtype).eval()


def variants() -> dict[str, object]:
    """The config variants :func:`warmup` runs: the defaults (consensus and cross-layer momentum on) with
    tiers per query head, per GQA group and joined over the group, the tiered prefill (query blocks of
    ``chunk_size``) and the block prefill."""
    from dashkv.config import DEFAULT_BITS, DashKVConfig

    # "cpu": fail loudly rather than warm up the reference; dense_below=0: the tiny context goes through the tiers
    base = DashKVConfig(bits=DEFAULT_BITS, backend="cpu", dense_below=0)
    return {
        "share=head": dataclasses.replace(base, share="head"),
        "share=group": dataclasses.replace(base, share="group"),
        "share=union": dataclasses.replace(base, share="union"),
        "prefill=tiered": dataclasses.replace(base, prefill="tiered"),
        "prefill=blocks": dataclasses.replace(base, prefill="blocks"),
    }


@torch.no_grad()
def _run_path(model, encoders, config, context: int, question: int, new_tokens: int) -> None:
    """Prefill, a question block over the cached context and single decode tokens, as a user's
    ``generate`` after a prefill runs them (the same attention calls; ``generate`` adds sampling)."""
    import dashkv
    from dashkv.cache import DashKVCache

    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=generator)
    cache = DashKVCache(encoders, config.dense_layers)
    with dashkv.enable(model, encoders, config):
        model(ids, past_key_values=cache, logits_to_keep=1)
        out = model(torch.randint(0, vocab, (1, question), generator=generator), past_key_values=cache,
                    logits_to_keep=1)  # fmt: skip
        for _ in range(new_tokens):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache)


def warmup(dtypes: tuple[torch.dtype, ...] = (torch.float32,), context: int = 300) -> WarmupReport:
    """Compile (or load from numba's cache) every kernel the CPU inference path uses.

    Runs :func:`_run_path` for each of :func:`variants` on :func:`tiny_model` with 128-bit random
    encoders (``HashEncoders.random``): what is compiled depends on argument types, not sizes, and
    the shipped encoders have the same parameter types.

    Parameters
    ----------
    dtypes : model dtypes to warm up; float32 is what :func:`dashkv.load_model` loads (16-bit K/V
        reach the kernels as raw ``uint16`` bits, other argument types)
    context : prefill tokens; not a multiple of 64, and more than the default sinks + window, so the
        tiers are not trivial

    Returns
    -------
    WarmupReport

    Raises
    ------
    ImportError
        Where numba cannot be imported (the CPU backend is unavailable; nothing to compile).
    """
    from dashkv.encoders import HashEncoders

    global _warned
    _warned = True  # compiling is this function's purpose: no "cold cache" warning from the backend
    start = time.perf_counter()
    kernels = cpu_kernels()  # ImportError here without numba
    before = {name: (sum(k.stats.cache_misses.values()), sum(k.stats.cache_hits.values()))
              for name, k in kernels.items()}  # fmt: skip
    report = WarmupReport(0.0)
    for dtype in dtypes:
        model = tiny_model(dtype=dtype)
        encoders = HashEncoders.random(model, seed=0)  # the default code length, as the config above
        for name, config in variants().items():
            _run_path(model, encoders, config, context, question=7, new_tokens=3)
            report.variants.append(f"{name}, {str(dtype).removeprefix('torch.')}")
    for name, kernel in kernels.items():
        misses, hits = sum(kernel.stats.cache_misses.values()), sum(kernel.stats.cache_hits.values())
        if misses > before[name][0]:
            report.compiled.append(name)
        elif hits > before[name][1]:
            report.loaded.append(name)
    report.seconds = time.perf_counter() - start
    return report
