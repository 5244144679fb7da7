"""Shared fixtures: a tiny random Qwen2 model with GQA (built from a local config, no download) and
the embedded default model (converted once, then cached)."""

from __future__ import annotations

import os

import pytest
import torch

# The Triton backend's tests (tests/ops/test_triton_*.py) run through Triton's interpreter where there is
# no GPU. It must be on before triton is first imported (transformers and kvpress import it, and
# triton's own library functions are defined then), so here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=97,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def default_model():
    import dashkv

    return dashkv.load_model()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (CI has none; run on a GPU machine)"))])
def device(request):
    """Tests that take it run on the CPU, and on a GPU where there is one."""
    return torch.device(request.param)
