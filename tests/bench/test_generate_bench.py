import os

import pytest
import torch

from dashkv import HashEncoders
from dashkv.baselines.budget import Budget
from dashkv.bench import generate, harness
from dashkv.config import DashKVConfig


def test_compare_measures_every_row_on_the_same_context(tiny_qwen2):
    encoders = HashEncoders.random(tiny_qwen2, bits=64, seed=0)
    contexts = [torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n)) for n in (40, 200)]
    tiered = DashKVConfig(bits=64, dense_below=0)  # the tiers at these tiny lengths too
    cases = generate.compare(tiny_qwen2, encoders, contexts, new_tokens=4, warmup_tokens=32, config=tiered)
    assert tiny_qwen2.config._attn_implementation == "sdpa"  # timing and DASH-KV both detached
    assert [c["length"] for c in cases] == [40, 200]
    config = DashKVConfig(bits=64)
    budget = Budget(config.high + config.mid, config.sinks, config.window)
    for case in cases:
        runs = case["runs"]
        assert list(runs) == list(generate.ROWS)
        for name, run in runs.items():
            assert run["context_tokens"] == case["length"] and len(run["tokens"]) == 4, name
            assert 0 < run["step_ms_min"] <= run["step_ms_median"] <= run["step_ms_max"], name
            assert run["tokens_per_s"] > 0 and run["cache_mb"] > 0 and run["prefill_s"] > 0, name
            assert 0 < run["attention_share"] < 1 and run["attention_ms_median"] > 0, name  # attention was timed
            assert run["vs_full"] == run["tokens_per_s"] / runs["full"]["tokens_per_s"]
            assert 0 <= run["same_tokens"] <= 4
        assert runs["full"]["vs_full"] == 1 and runs["full"]["same_tokens"] == 4
        assert runs["full_inplace"]["tokens"] == runs["full"]["tokens"]  # the same attention on another cache
        assert runs["full_kernel"]["tokens"] == runs["full"]["tokens"]  # exact attention through the dense kernel
        for name in ("full", "full_inplace", "full_kernel", "dashkv_head", "dashkv_group", "dashkv_union"):
            assert runs[name]["kept_tokens"] == case["length"]
        # SnapKV keeps DASH-KV's high + mid budget (nothing to drop at 40 tokens: sinks + window + 20 %)
        assert runs["snapkv"]["kept_tokens"] == budget.kept(case["length"])
        assert set(case["tiers"]) == {"dashkv_head", "dashkv_group", "dashkv_union"}
        assert all(set(t) == {"high", "mid", "low"} for t in case["tiers"].values())
    assert all(case["peak_rss_mb"] > 0 for case in cases)
    assert cases[1]["runs"]["snapkv"]["kept_tokens"] < 200
    assert cases[1]["runs"]["snapkv"]["cache_mb"] < cases[1]["runs"]["full"]["cache_mb"]  # it dropped keys
    table = generate.table({"cases": cases, "encoders": "random", "new_tokens": 4, "busy": {"processes": 2}})
    assert table.count("\n| ") == 2 * len(generate.ROWS)  # the data rows
    assert "SnapKV" in table and "2 CPU-bound competitor processes" in table


def test_contexts_above_single_shot_share_one_chunked_prefill(monkeypatch):
    """Above SINGLE_SHOT every row copies one exact chunked prefill (sliding layers as transformers keeps
    them): full attention on either cache decodes what it decodes after single-shot prefills and DASH-KV
    rows hold every key coded. No SnapKV row on a model with sliding layers."""
    from tiny_gemma import tiny_gemma3

    from dashkv.cache import DashKVLayer

    model = tiny_gemma3()
    encoders = HashEncoders.random(model, bits=64, seed=0)
    context = [torch.randint(3, 97, (1, 120), generator=torch.Generator().manual_seed(1))]
    config = DashKVConfig(bits=64, dense_below=0)
    single = generate.compare(model, encoders, context, new_tokens=5, warmup_tokens=0, config=config)[0]["runs"]
    monkeypatch.setattr(generate, "SINGLE_SHOT", 64)
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 32)
    coded = []
    monkeypatch.setattr(DashKVLayer, "code_views", lambda self, pending=64, f=DashKVLayer.code_views:
                        coded.append((self.length, pending)) or f(self, pending))  # fmt: skip
    shared = generate.compare(model, encoders, context, new_tokens=5, warmup_tokens=0, config=config)[0]["runs"]
    assert "snapkv" not in single and "snapkv" not in shared
    for name in ("full", "full_inplace", "full_kernel"):
        assert shared[name]["tokens"] == single["full"]["tokens"], name
    for name in ("dashkv_head", "dashkv_group", "dashkv_union"):
        assert shared[name]["kept_tokens"] == 120 and shared[name]["prefill_s"] > 0
    assert coded[:6] == [(120, 0)] * 6  # three DASH-KV rows x two full layers, coded whole after the copy


def test_timed_attention_times_the_attention_calls_and_restores(tiny_qwen2):
    timer = harness.AttentionTimer()
    with harness.timed_attention(tiny_qwen2, timer):
        assert tiny_qwen2.config._attn_implementation == "timed_sdpa"
        with torch.no_grad():
            tiny_qwen2(torch.randint(0, 97, (1, 16)))
    assert timer.seconds > 0 and tiny_qwen2.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"), harness.timed_attention(tiny_qwen2, timer):
        raise RuntimeError("boom")
    assert tiny_qwen2.config._attn_implementation == "sdpa"


def test_competitors_run_for_the_block_and_are_always_terminated():
    with harness.Competitors(2) as busy:
        assert [p.is_alive() for p in busy.processes] == [True, True]
    assert not any(p.is_alive() for p in busy.processes)
    record = busy.record()
    assert record["processes"] == 2 and len(record["cpu_seconds"]) == 2
    if os.path.exists("/proc/self/stat"):
        assert all(s is not None and s >= 0 for s in record["cpu_seconds"])
    with pytest.raises(KeyboardInterrupt), harness.Competitors(1) as busy:
        raise KeyboardInterrupt  # Ctrl-C during the measurement
    assert not busy.processes[0].is_alive()
    with harness.Competitors(0) as idle:
        assert idle.processes == []
    assert idle.record()["processes"] == 0


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(lengths=()), "lengths"),
        (dict(lengths=(2048, 0)), "lengths"),
        (dict(new_tokens=1), "new_tokens"),
        (dict(busy=-1), "busy"),
        (dict(busy=harness.MAX_BUSY + 1), "busy"),
        (dict(threads=0), "threads"),
    ],
)
def test_check_options_names_the_bad_option(kwargs, word):
    options = dict(lengths=(2048,), new_tokens=8, busy=0, threads=2) | kwargs
    with pytest.raises(ValueError, match=word):
        generate.check_options(**options)


def test_peak_rss_sees_an_allocation():
    with harness.PeakRss() as rss:
        block = torch.ones(64 * 2**20 // 4)
        block.add_(1)
    assert rss.peak >= 64 * 2**20
