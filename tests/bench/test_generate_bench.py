import torch

from dashkv import HashEncoders
from dashkv.bench import generate


def test_compare_times_both_methods_on_the_same_context(tiny_qwen2):
    encoders = HashEncoders.random(tiny_qwen2, bits=64, seed=0)
    contexts = [torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n)) for n in (40, 90)]
    cases = generate.compare(tiny_qwen2, encoders, contexts, new_tokens=4)
    assert [c["length"] for c in cases] == [40, 90]
    for case in cases:
        for name in ("full", "dashkv"):
            run = case[name]
            assert run["context_tokens"] == case["length"] and len(run["tokens"]) == 4
            assert 0 < run["step_ms_min"] <= run["step_ms_median"] <= run["step_ms_max"]
            assert run["tokens_per_s"] > 0 and run["peak_rss_mb"] > 0
        assert case["speedup"] == case["dashkv"]["tokens_per_s"] / case["full"]["tokens_per_s"]
        assert 0 <= case["same_tokens"] <= 4 and set(case["tiers"]) == {"high", "mid", "low"}
    table = generate.table({"cases": cases, "encoders": "random", "new_tokens": 4})
    assert table.count("\n| ") == 2  # the data rows


def test_peak_rss_sees_an_allocation():
    with generate.PeakRss() as rss:
        block = torch.ones(64 * 2**20 // 4)
        block.add_(1)
    assert rss.peak >= 64 * 2**20
