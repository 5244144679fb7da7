"""Suites at each model's lengths: which suite a model gets, chunked prefills beyond a single shot, and
which methods those can measure."""

import pytest
import torch

from dashkv.baselines.method import Method
from dashkv.eval import suite
from dashkv.eval.fidelity import documents
from dashkv.eval.suite import SUITES, measurable, prefill_for, suite_for
from dashkv.models import GEMMA_MODEL
from dashkv.prefilled import prefill


def test_a_model_gets_the_suite_at_its_lengths():
    assert suite_for("quick", None) is SUITES["quick"] and suite_for("full", "some/other-model") is SUITES["full"]
    gemma = suite_for("full", GEMMA_MODEL)
    assert {length for _, length, _ in gemma.cells()} == {2048, 8192, 16384}
    assert all(count >= 20 for _, length, count in gemma.cells() if length >= 8192)
    assert gemma.fidelity_lengths == (8192, 16384, 32768)
    with pytest.raises(ValueError, match="suite='long' is not known"):
        suite_for("long", GEMMA_MODEL)


def test_beyond_a_single_shot_the_prefill_is_chunked_and_scorer_methods_are_left_out(tiny_qwen2, monkeypatch):
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    single = prefill(tiny_qwen2, ids)
    chunked = prefill(tiny_qwen2, ids, chunk_size=16)
    for (k1, v1), (k2, v2) in zip(single.keys_values(), chunked.keys_values()):
        assert torch.allclose(k1, k2, atol=1e-5) and torch.allclose(v1, v2, atol=1e-5)
    with pytest.raises(ValueError, match="recorder"):
        prefill(tiny_qwen2, ids, recorder=lambda scores: None, chunk_size=16)
    plain, scored = Method(name="full"), Method(name="snapkv", budget=0.05, presses=("snapkv",))
    monkeypatch.setattr(suite, "SINGLE_SHOT", 32)
    assert measurable([plain, scored], 32) == [plain, scored]
    assert measurable([plain, scored], 33) == [plain]
    assert len(prefill_for(tiny_qwen2, ids, [plain]).cache.layers[0].keys[0, 0]) == 40  # chunked, all of it


def test_fidelity_documents_longer_than_the_held_out_text_repeat_it(default_model):
    _, tokenizer = default_model
    (doc,) = documents(tokenizer, 16384, 1)
    assert doc.shape == (1, 16384)
    period = next(p for p in range(1000, 16384) if torch.equal(doc[0, p : p + 64], doc[0, :64]))
    assert torch.equal(doc[0, period:], doc[0, : 16384 - period])  # a copy of the start: a retrieval test
