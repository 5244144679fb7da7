import json

from dashkv.bench import attention


def test_bench_writes_json_and_plot_with_a_dense_baseline(tmp_path):
    results = attention.run(sizes=(300, 700), shapes=("smollm2",), repeats=2, warmup=1, output=tmp_path,
                            bandwidth_mb=8)
    saved = json.loads((tmp_path / "attention.json").read_text())
    assert saved["machine"]["read_bandwidth_gbps"] > 0
    assert [c["seq"] for c in saved["cases"]] == [300, 700]
    for case in saved["cases"]:
        for name in ("sdpa", "dashkv_fused", "dashkv_high", "dashkv_step", "dashkv_step_group", "dashkv_step_union", "dashkv_floor",
                     "dashkv_dense"):
            assert 0 < case[name]["low"] <= case[name]["median"] <= case[name]["high"]
        assert case["speedup_fused"] == case["sdpa"]["median"] / case["dashkv_fused"]["median"]
        assert case["fused_over_floor"] == case["dashkv_fused"]["median"] / case["dashkv_floor"]["median"]
        assert case["code_scan_gbps"] > 0 and case["encode_new_key_ms"]["median"] > 0
    assert (tmp_path / "attention.png").stat().st_size > 10_000
    assert "| smollm2 | 700 |" in attention.table(results)
