"""A tiny random Gemma-3 model built from a local config (no download): Gemma's attention geometry
(one KV head, head dim 256, QK-norm, its own query scaling) with sliding and full layers mixed."""

from __future__ import annotations

import torch

# layers 0-1 slide, 2 is full, 3 slides, 4 is full: sliding layers before, between and after full ones
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]
WINDOW = 16


def tiny_gemma3(seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=64,
        layer_types=LAYER_TYPES, sliding_window=WINDOW, max_position_embeddings=512,
        attn_implementation="sdpa", pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )  # fmt: skip
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # random norms so QK-norm is not the identity
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    return model
