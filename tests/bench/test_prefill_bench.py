import pytest
import torch

from dashkv import HashEncoders
from dashkv.bench import prefill
from dashkv.config import DashKVConfig


def _contexts():
    return [torch.randint(3, 97, (1, 160), generator=torch.Generator().manual_seed(7))]


def test_every_mode_is_timed_against_dense_and_scored_on_the_tail(tiny_qwen2, monkeypatch):
    monkeypatch.setattr(prefill, "PREFILL_CHUNK", 48)
    encoders = HashEncoders.random(tiny_qwen2, bits=64, seed=0)
    config = DashKVConfig(bits=64, dense_below=0, dense_layers=(), prefill_block=16)
    (case,) = prefill.compare(tiny_qwen2, encoders, _contexts(), prefill.MODES, config, tail=24)
    runs = case["runs"]
    assert list(runs) == ["dense", "tiered", "blocks"] and case["length"] == 160 and case["tail"] == 24
    assert runs["dense"]["vs_dense"] == 1.0 and runs["dense"]["kl"] == pytest.approx(0, abs=1e-6)
    assert runs["dense"]["same_argmax"] == 1.0
    for mode in ("tiered", "blocks"):
        r = runs[mode]
        assert r["prefill_s"] > 0 and r["vs_dense"] == runs["dense"]["prefill_s"] / r["prefill_s"]
        assert r["kl"] > 1e-4 and r["tail_ppl"] > 1  # random codes at 20 %: the tail moved
    assert prefill.table({"cases": [case]}).count("\n| 160 |") == 3


def test_with_every_key_kept_each_prefill_mode_equals_dense(tiny_qwen2, monkeypatch):
    monkeypatch.setattr(prefill, "PREFILL_CHUNK", 48)
    encoders = HashEncoders.random(tiny_qwen2, bits=64, seed=0)
    config = DashKVConfig.full(bits=64, dense_layers=(), prefill_block=16)
    (case,) = prefill.compare(tiny_qwen2, encoders, _contexts(), prefill.MODES, config, tail=24)
    for mode in ("tiered", "blocks"):
        assert case["runs"][mode]["kl"] < 1e-6 and case["runs"][mode]["same_argmax"] == 1.0


def test_options_are_checked_before_the_model_loads():
    with pytest.raises(ValueError, match="--modes"):
        prefill.check_options((8192,), ("dense", "sparse"))
    with pytest.raises(ValueError, match="--lengths"):
        prefill.check_options((1000,), ("dense",))
