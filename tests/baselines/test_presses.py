import dataclasses

import pytest
import torch
from kvpress import ObservedAttentionPress, SnapKVPress, StreamingLLMPress
from transformers import DynamicCache

from dashkv.baselines import Budget
from dashkv.baselines.method import Method
from dashkv.baselines.presses import press_method, recorder_for
from dashkv.eval.protocol import block_logits
from dashkv.prefilled import prefill


@torch.no_grad()
def _kvpress_itself(model, ids, question, press, eager):
    """kvpress compressing during the prefill, then the question at the true positions (its pipeline)."""
    cache = DynamicCache()
    previous = model.config._attn_implementation
    try:
        if eager:
            model.set_attn_implementation("eager")
        with press(model):
            model.model(input_ids=ids, past_key_values=cache)
    finally:
        model.set_attn_implementation(previous)
    return block_logits(model, cache, question, ids.shape[1])


@pytest.mark.parametrize("name", ["snapkv", "h2o", "streamingllm"])
@torch.no_grad()
def test_recorded_scores_compress_exactly_like_kvpress(tiny_qwen2, name):
    torch.manual_seed(0)
    ids, question = torch.randint(0, 97, (1, 240)), torch.randint(0, 97, (1, 6))
    budget = Budget(0.1, sinks=4, window=16)
    method = press_method(name, budget)
    kept = budget.kept(ids.shape[1])
    ratio = 1.0 - (kept + 0.5) / ids.shape[1]
    press = {"snapkv": SnapKVPress(ratio), "h2o": ObservedAttentionPress(ratio),
             "streamingllm": StreamingLLMPress(ratio, n_sink=4)}[name]
    expected = _kvpress_itself(tiny_qwen2, ids, question, press, eager=name == "h2o")

    pre = prefill(tiny_qwen2, ids, recorder_for(tiny_qwen2, method.presses) if method.presses else None)
    cache = method.build_cache(tiny_qwen2, pre)
    assert cache.layers[0].keys.shape[-2] == kept
    got = block_logits(tiny_qwen2, cache, question, pre.length)
    assert torch.allclose(got, expected, atol=1e-4)
    # the prefill itself is never compressed: every method starts from the same dense cache
    assert pre.cache.layers[0].keys.shape[-2] == ids.shape[1]


def test_unknown_press_is_named():
    with pytest.raises(ValueError, match="quest"):
        press_method("quest", Budget(0.05))


@pytest.mark.parametrize("name", ["snapkv", "streamingllm"])
def test_sliding_window_layers_keep_their_keys_and_full_layers_are_pressed(name):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tiny_gemma import LAYER_TYPES, WINDOW, tiny_gemma3

    model = tiny_gemma3()
    ids = torch.randint(3, 97, (1, 200), generator=torch.Generator().manual_seed(0))
    budget = Budget(0.1, sinks=4, window=16)
    method = press_method(name, budget)
    pre = prefill(model, ids, recorder_for(model, method.presses) if method.presses else None)
    cache = method.build_cache(model, pre)
    for layer, kind in zip(cache.layers, LAYER_TYPES):  # the sliding layers hold their window, as transformers'
        assert layer.keys.shape[-2] == (budget.kept(200) if kind == "full_attention" else WINDOW - 1)
    # with every full layer's keys kept, the pressed cache answers exactly as full attention does
    whole = dataclasses.replace(method, budget=1.0).build_cache(model, pre)
    full = Method().build_cache(model, pre)
    question = ids[:, :5]
    assert torch.allclose(block_logits(model, whole, question, pre.length), block_logits(model, full, question, pre.length),
                          atol=1e-5)  # fmt: skip
    # causal within the block although pressed and sliding layers hold different lengths: changing the
    # block's last token changes none of the earlier rows
    other = question.clone()
    other[0, -1] = (other[0, -1] + 1) % 97
    first = block_logits(model, method.build_cache(model, pre), question, pre.length)
    second = block_logits(model, method.build_cache(model, pre), other, pre.length)
    assert torch.equal(first[:-1], second[:-1]) and not torch.equal(first[-1], second[-1])
