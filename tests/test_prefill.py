"""The chunked prefill equals a single-shot prefill, and generate after it equals plain generate."""

import copy

import pytest
import torch
from tiny_gemma import WINDOW, tiny_gemma3
from transformers.cache_utils import DynamicCache

from dashkv.prefill import chunked_prefill, generate_chunked


@pytest.fixture(scope="module")
def tiny_gemma():
    return tiny_gemma3()


def _models(tiny_qwen2, tiny_gemma):
    return {"qwen2": tiny_qwen2, "gemma3": tiny_gemma}


@pytest.mark.parametrize("name", ["qwen2", "gemma3"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 50])
def test_chunked_prefill_equals_single_shot(tiny_qwen2, tiny_gemma, name, chunk):
    model = _models(tiny_qwen2, tiny_gemma)[name]
    ids = torch.randint(3, 97, (2, 61), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        single = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    cache, logits = chunked_prefill(model, ids, chunk_size=chunk)
    # float rounding of other matmul shapes only: a chunk at wrong positions is off by O(1)
    torch.testing.assert_close(logits, single.logits[:, -1], rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == ids.shape[1]
    for mine, theirs in zip(cache.layers, single.past_key_values.layers):
        assert type(mine) is type(theirs)
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-4, atol=1e-4)
    if name == "gemma3":  # the sliding layers kept only their window, as transformers does
        assert cache.layers[0].keys.shape[-2] == WINDOW - 1


@pytest.mark.parametrize("name", ["qwen2", "gemma3"])
def test_generate_after_chunked_prefill_equals_generate(tiny_qwen2, tiny_gemma, name):
    model = _models(tiny_qwen2, tiny_gemma)[name]
    ids = torch.randint(3, 97, (1, 45), generator=torch.Generator().manual_seed(2))
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():
        plain = model.generate(ids, **settings)
    assert torch.equal(generate_chunked(model, ids, chunk_size=8, **settings), plain)


def test_left_padded_batch_is_prefilled_at_its_true_positions(tiny_gemma):
    model = tiny_gemma
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # row 1 is left-padded by 9
    ids[1, :9] = 0
    with torch.no_grad():
        single = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    _, logits = chunked_prefill(model, ids, chunk_size=6, attention_mask=mask)
    torch.testing.assert_close(logits, single.logits[:, -1], rtol=1e-4, atol=1e-4)
    alone = model(ids[1:, 9:]).logits[:, -1]  # the padded row equals the row without padding
    torch.testing.assert_close(logits[1:], alone, rtol=1e-4, atol=1e-4)


def test_bad_arguments_are_refused(tiny_qwen2):
    ids = torch.randint(3, 97, (1, 10))
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunked_prefill(tiny_qwen2, ids, chunk_size=0)
    with pytest.raises(ValueError, match="input_ids"):
        chunked_prefill(tiny_qwen2, ids[0])
    cache, _ = chunked_prefill(tiny_qwen2, ids)
    with pytest.raises(ValueError, match="empty cache"):
        chunked_prefill(copy.deepcopy(tiny_qwen2), ids, past_key_values=cache)
