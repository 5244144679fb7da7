import pytest
import torch

import dashkv
from dashkv.baselines import Budget, build_methods
from dashkv.config import DashKVConfig
from dashkv.ops.reference import select_largest


def test_budget_counts_sinks_window_and_selected():
    b = Budget(0.05, sinks=4, window=64)
    assert b.selected(2048) == 99  # ceil(0.05 * 1980)
    assert b.kept(2048) == 4 + 64 + 99
    assert Budget(1.0).kept(500) == 500
    assert Budget(0.5).kept(10) == 10  # shorter than sinks + window: everything is kept
    with pytest.raises(ValueError, match="share"):
        Budget(0.0)


def test_select_largest_is_exact_topk_of_eligible():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 4, 50)
    eligible = torch.rand(2, 1, 4, 50) > 0.3
    k = torch.tensor([0, 1, 7, 100]).view(1, 1, 4).expand(2, 1, 4)
    chosen = select_largest(scores, eligible, k)
    n = eligible.expand_as(scores).sum(-1)
    assert torch.equal(chosen.sum(-1), torch.minimum(k.expand_as(n), n))
    assert not (chosen & ~eligible).any()
    masked = scores.masked_fill(~eligible, float("-inf"))
    top = masked[1, 2, 2].topk(7).indices
    assert set(top.tolist()) == set(chosen[1, 2, 2].nonzero().flatten().tolist())


def test_oracle_config_validation():
    with pytest.raises(ValueError, match="selector"):
        DashKVConfig(selector="exact")
    with pytest.raises(ValueError, match="mid"):
        DashKVConfig(selector="oracle", mid=0.1)


def _block_output(model, encoders, config, ids):
    cache = dashkv.DashKVCache(encoders, config.dense_layers)
    with dashkv.enable(model, encoders, config):
        model(ids[:, :-8], past_key_values=cache)
        return model(ids[:, -8:], past_key_values=cache).logits


@torch.no_grad()
def test_oracle_at_full_budget_is_full_attention(tiny_qwen2):
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (1, 200))
    full = tiny_qwen2(ids).logits[:, -8:]
    enc = dashkv.HashEncoders.random(tiny_qwen2, bits=16, seed=0)
    everything = DashKVConfig(bits=16, high=1.0, mid=0.0, selector="oracle", consensus=False, momentum=False)
    assert torch.allclose(_block_output(tiny_qwen2, enc, everything, ids), full, atol=1e-4)


@torch.no_grad()
def test_oracle_high_tier_holds_at_least_the_mass_of_any_hash_selection(tiny_qwen2):
    from dashkv.attention import tiered_step, visibility
    from dashkv.ops import reference

    torch.manual_seed(2)
    q, k, v = torch.randn(1, 6, 5, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    enc = dashkv.HashEncoders.random(tiny_qwen2, bits=16, seed=0).layers[1]
    visible = visibility(1, 5, 300, None, q.device)
    full = torch.softmax(q @ reference.expand_kv(k, 6).transpose(-1, -2) * 0.25 + (~visible) * -1e9, -1)
    small = dict(bits=16, high=0.05, mid=0.0, sinks=2, window=4, consensus=False, momentum=False)
    masses = {}
    for selector in ("oracle", "hash"):
        cfg = DashKVConfig(selector=selector, **small)
        codes, norms = enc.encode_key(k)
        tiers = tiered_step(q, k, v, codes, norms, enc, cfg, visible, 0.25, None, reference).tiers
        assert int((tiers == reference.HIGH).sum(-1).max()) == 2 + 4 + 15  # sinks + window + ceil(0.05 * 290)
        masses[selector] = (full * (tiers == reference.HIGH)).sum(-1)
    assert (masses["oracle"] >= masses["hash"] - 1e-6).all()
    assert (masses["oracle"] > masses["hash"] + 1e-3).any()


def test_build_methods_rows_and_errors(tiny_qwen2):
    enc = dashkv.HashEncoders.random(tiny_qwen2, bits=64, seed=0)
    rows = build_methods(tiny_qwen2, enc, ("full", "kivi", "dashkv", "oracle", "snapkv", "h2o"), (0.02, 0.05))
    names = [(r.name, r.budget) for r in rows]
    assert names[:2] == [("full", None), ("kivi", None)]
    assert ("h2o", 0.05) in names and ("oracle", 0.02) in names
    dash = next(r for r in rows if r.name == "dashkv" and r.budget == 0.05)
    assert dash.config.high == 0.05 and dash.config.mid == pytest.approx(0.15) and dash.config.consensus
    with pytest.raises(ValueError, match="methods"):
        build_methods(tiny_qwen2, enc, ("quest",), (0.05,))
    ablation = build_methods(tiny_qwen2, enc, ("ablation",), (0.05,))
    assert [r.name for r in ablation] == ["abl:hash-only", "abl:+consensus", "abl:+momentum", "abl:symmetric",
                                          "abl:bits16", "abl:bits32", "abl:bits128"]
    untrained = build_methods(tiny_qwen2, enc, ("ablation",), (0.05,), trained=False)
    assert [r.name for r in untrained] == ["abl:+consensus", "abl:+momentum", "abl:bits16", "abl:bits32", "abl:bits128"]


def test_symmetric_encoders_hash_queries_with_the_key_map(tiny_qwen2):
    from dashkv.baselines.hashing import symmetric

    enc = dashkv.HashEncoders.random(tiny_qwen2, bits=32, seed=0)
    with torch.no_grad():  # an asymmetric query side, as training would leave it
        for layer in enc.layers:
            layer.query_mlp[-1].weight.normal_()
            layer.query_skip.add_(torch.randn_like(layer.query_skip))
    sym = symmetric(enc)
    x = torch.randn(1, 2, 7, 16)  # KV-head vectors; each query head of a group sees its KV head's map
    layer, original = sym.layers[1], enc.layers[1]
    queries = x.repeat_interleave(3, dim=1)
    assert torch.equal(layer.encode_query(queries)[:, ::3], layer.encode_key(x)[0])  # key_center is 0 here
    assert not torch.equal(original.encode_query(queries)[:, ::3], original.encode_key(x)[0])
    assert torch.equal(layer.key_proj, original.key_proj)  # the key side is untouched


def test_the_oracle_keeps_one_share_in_every_layer_and_the_dashkv_cache(tiny_qwen2):
    """Encoders that share the high tier unevenly (``budget_scales``) change DASH-KV's rows, not the
    oracle's: its ceiling is the budget in every layer. It still reads the DASH-KV row's hashed cache."""
    from dashkv.prefilled import prefill

    enc = dashkv.HashEncoders.random(tiny_qwen2, bits=64, seed=0)
    enc.budget_scales = {1: 1.6, 2: 0.4}
    rows = build_methods(tiny_qwen2, enc, ("dashkv", "oracle"), (0.05,))
    dash, oracle = (next(r for r in rows if r.name == name) for name in ("dashkv", "oracle"))
    assert dash.encoders.budget_scales == {1: 1.6, 2: 0.4} and oracle.encoders.budget_scales == {}
    assert enc.budget_scales == {1: 1.6, 2: 0.4}  # the caller's encoders are left as they were
    context = prefill(tiny_qwen2, torch.randint(1, 97, (1, 80), generator=torch.Generator().manual_seed(0)))
    assert oracle.build_cache(tiny_qwen2, context) is dash.build_cache(tiny_qwen2, context)
