"""Gemma-3 support on a tiny random model of its architecture: DASH-KV on the full-attention layers,
the sliding-window layers (and their cache layers) exactly as transformers runs them."""

import copy

import pytest
import torch
from tiny_gemma import LAYER_TYPES, WINDOW, tiny_gemma3
from transformers import LlamaConfig, MistralConfig, Qwen2Config
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

import dashkv
from dashkv import DashKVConfig, HashEncoders
from dashkv.cache import DashKVCache, DashKVLayer
from dashkv.models import sliding_windows
from dashkv.prefill import chunked_prefill

FULL = [i for i, kind in enumerate(LAYER_TYPES) if kind == "full_attention"]
SLIDING = [i for i, kind in enumerate(LAYER_TYPES) if kind == "sliding_attention"]
NEW = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)


@pytest.fixture(scope="module")
def gemma():
    return tiny_gemma3()


@pytest.fixture(scope="module")
def encoders(gemma):
    return HashEncoders.random(gemma, bits=DashKVConfig.bits, seed=0)


def _ids(length: int, batch: int = 1, seed: int = 4) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_sliding_rule_is_the_one_transformers_caches_follow(gemma):
    configs = [
        gemma.config,
        LlamaConfig(num_hidden_layers=3),
        Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=32, max_window_layers=2),
        MistralConfig(num_hidden_layers=2, sliding_window=64),
    ]
    for config in configs:
        theirs = {i for i, sliding in enumerate(DynamicCache(config=config).is_sliding) if sliding}
        assert set(sliding_windows(config)) == theirs, type(config).__name__
    assert sliding_windows(gemma.config) == {i: WINDOW for i in SLIDING}


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("prefill", ["dense", "tiered", "blocks"])
def test_all_high_generate_equals_full_attention(gemma, encoders, prefill, backend):
    """The anchor property with sliding layers beside the tiered ones; prompts longer than the window;
    head dim 256 and one KV head through both backends."""
    ids = _ids(70, batch=2)
    config = DashKVConfig.full(dense_layers=(), prefill=prefill, backend=backend)
    with torch.no_grad():
        full = gemma.generate(ids, **NEW)
        with dashkv.enable(gemma, encoders, config) as stats:
            hashed = gemma.generate(ids, **NEW)
    assert torch.equal(hashed, full)
    summary = stats.summary()
    assert sorted(k for k in summary if k != "mean") == FULL  # the sliding layers never went through the tiers
    assert summary["mean"]["high"] == 1.0


def _attention_outputs(model, run) -> dict[int, list[torch.Tensor]]:
    outputs: dict[int, list[torch.Tensor]] = {}
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: outputs.setdefault(i, []).append(out[0]))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def _teacher_forced(model, ids: torch.Tensor, prompt: int, cache) -> None:
    """A prefill of ``ids[:, :prompt]``, then the remaining tokens one decode step each (the same
    inputs whatever the attention predicts)."""
    model(ids[:, :prompt], past_key_values=cache, use_cache=True)
    for t in range(prompt, ids.shape[1]):
        model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)


def test_sliding_layers_run_exactly_as_transformers_runs_them(gemma, encoders):
    """Bit for bit: the sliding layers before the first full one see the same inputs with and without
    DASH-KV, so their outputs (prefill and every decode step) must be identical while the full layers
    run real tiers; the cache gives them transformers' own sliding layers, holding the window only."""
    ids, prompt = _ids(62), 50
    with torch.no_grad():
        plain = DynamicCache(config=gemma.config)  # what the model makes for itself
        stock = _attention_outputs(gemma, lambda: _teacher_forced(gemma, ids, prompt, plain))
        cache = DashKVCache(encoders, (), config=gemma.config)
        # a 5 % high tier on the full layers, even at this tiny length (full() leaves nothing dense)
        tiered = DashKVConfig.full(high=0.05, mid=0.15, sinks=2, window=8, dense_layers=())
        with dashkv.enable(gemma, encoders, tiered) as stats:
            ours = _attention_outputs(gemma, lambda: _teacher_forced(gemma, ids, prompt, cache))
    summary = stats.summary()
    assert sorted(k for k in summary if k != "mean") == FULL and summary["mean"]["high"] < 1.0
    for layer in range(FULL[0]):
        assert len(ours[layer]) == len(stock[layer]) == 1 + ids.shape[1] - prompt
        assert all(torch.equal(a, b) for a, b in zip(ours[layer], stock[layer]))
    assert not torch.equal(ours[FULL[0]][-1], stock[FULL[0]][-1])  # the full layer did run tiered
    for i, layer in enumerate(cache.layers):
        if i in SLIDING:
            assert type(layer) is DynamicSlidingWindowLayer and layer.keys.shape[-2] == WINDOW - 1
        else:
            assert type(layer) is DashKVLayer and layer.codes is not None
            assert layer.keys.shape[-2] == ids.shape[1]


def test_layers_the_encoders_leave_dense_attend_exactly_whatever_the_config(gemma, encoders):
    """``HashEncoders.dense_layers`` joins ``DashKVConfig.dense_layers``: with every full layer named, a
    5 % budget generates what full attention does; with one named, that layer attends exactly (no
    codes in its cache layer, no tier counts) while the other runs the tiers."""
    ids = _ids(70, batch=2)
    tiered = DashKVConfig.full(high=0.05, mid=0.15, sinks=2, window=8, dense_layers=())
    with torch.no_grad():
        full = gemma.generate(ids, **NEW)
        for named in (FULL, FULL[:1]):
            dense = copy.deepcopy(encoders)
            dense.dense_layers = named
            cache = DashKVCache(dense, tiered.dense_layers, config=gemma.config)
            with dashkv.enable(gemma, dense, tiered) as stats:
                hashed = gemma.generate(ids, past_key_values=cache, **NEW)
            assert sorted(stats.counts) == [i for i in FULL if i not in named]
            assert all(stats.dense_calls[i] > 0 for i in named)
            assert all(cache.layers[i].encoder is None and cache.layers[i].codes is None for i in named)
            if named == FULL:
                assert torch.equal(hashed, full)
            else:
                assert stats.summary()[FULL[1]]["high"] < 1.0


def test_a_cache_prefilled_outside_the_block_is_upgraded_on_its_full_layers_only(gemma, encoders):
    """Exact chunked prefill first, then DASH-KV decodes from the same mixed cache."""
    ids = _ids(60, seed=5)
    with torch.no_grad():
        reference = gemma.generate(ids, past_key_values=chunked_prefill(gemma, ids[:, :-1], 16)[0], **NEW)
        cache, _ = chunked_prefill(gemma, ids[:, :-1], chunk_size=16)
        kept = {i: cache.layers[i] for i in SLIDING}
        with dashkv.enable(gemma, encoders, DashKVConfig.full(dense_layers=())):
            hashed = gemma.generate(ids, past_key_values=cache, **NEW)
    assert torch.equal(hashed, reference)
    assert all(cache.layers[i] is layer for i, layer in kept.items())  # the very same objects
    assert all(type(cache.layers[i]) is DashKVLayer and cache.layers[i].codes is not None for i in FULL)


def test_a_lazily_built_cache_keeps_the_kind_it_would_have_made(gemma, encoders):
    ids = _ids(30, seed=6)
    cache = DynamicCache()  # no config: transformers itself would give every layer a plain DynamicLayer
    with torch.no_grad(), dashkv.enable(gemma, encoders, DashKVConfig.full(dense_layers=())):
        gemma(ids, past_key_values=cache, use_cache=True)
    assert [type(layer) for layer in cache.layers] == [
        DynamicLayer if i in SLIDING else DashKVLayer for i in range(len(LAYER_TYPES))
    ]


def test_models_it_cannot_serve_are_refused(gemma, encoders):
    capped = copy.deepcopy(gemma)
    capped.config.attn_logit_softcapping = 50.0
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
        with dashkv.enable(capped, encoders):
            pass
    all_sliding = copy.deepcopy(gemma)
    all_sliding.config.layer_types = ["sliding_attention"] * len(LAYER_TYPES)
    with pytest.raises(ValueError, match="every layer attends to a sliding window"):
        with dashkv.enable(all_sliding, encoders):
            pass


def test_training_covers_the_full_attention_layers_only(gemma, tmp_path):
    """`dashkv train`'s path: teacher signals and encoders for the full layers, at the model's own scaling."""
    import json

    from dashkv.models import attention_scaling, tiered_layers
    from dashkv.training.collect import collect
    from dashkv.training.train import TrainConfig, train_encoders

    assert tiered_layers(gemma) == FULL
    assert attention_scaling(gemma) == 64**-0.5  # query_pre_attn_scalar, not head_dim
    windows = [_ids(160, seed=s)[0] for s in range(2)]
    signals = collect(gemma, windows, 8, 100)
    assert sorted(signals) == FULL
    cfg = TrainConfig(steps=3, seq_len=160, sequences=2, long_seq_len=160, long_sequences=0, queries_per_sequence=8,
                      queries_per_step=8, keys_per_step=64, min_position=100, sinks=4, window=16, stage2_steps=1,
                      discount_sequences=1, dense_layers=(), layer_workers=1)  # fmt: skip
    trained = train_encoders(gemma, signals, cfg, tmp_path)
    assert sorted(int(layer) for layer in json.loads((tmp_path / "training.json").read_text())["layers"]) == FULL
    untouched = HashEncoders.random(gemma, bits=cfg.bits, seed=cfg.seed)
    for layer in range(len(LAYER_TYPES)):
        same = torch.equal(trained.layers[layer].key_proj, untouched.layers[layer].key_proj.half().float())
        assert same == (layer in SLIDING), layer


@pytest.mark.slow
def test_the_embedded_gemma_loads_predicts_prose_and_keeps_the_anchor():
    """The real Gemma-3-270M: its loss on held-out prose is a language model's (with transformers' own
    GGUF tokenizer it was 7.7), and all-high DASH-KV on its global layers equals full attention past
    the 512-token window."""
    from dashkv.corpus import text
    from dashkv.models import GEMMA_MODEL

    model, tokenizer = dashkv.load_model(GEMMA_MODEL)
    assert model.config.model_type == "gemma3_text" and sliding_windows(model.config)
    ids = tokenizer(text("eval")[:8000], return_tensors="pt").input_ids[:, :1024]
    assert ids[0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 3.5, loss
    prompt = ids[:, :700]
    encoders = HashEncoders.random(model, bits=DashKVConfig.bits, seed=0)
    with torch.no_grad():
        full = model.generate(prompt, **NEW)
        with dashkv.enable(model, encoders, DashKVConfig.full(dense_layers=())):
            hashed = model.generate(prompt, **NEW)
    assert torch.equal(hashed, full)


def test_a_cache_made_without_the_config_gets_sliding_layers_on_first_use(gemma, encoders):
    """`DashKVCache(encoders, dense)` as eval and bench code builds it: its still-empty layers at
    sliding indices become transformers' sliding layers, and generate equals full attention."""
    ids = _ids(40, seed=7)
    cache = DashKVCache(encoders, ())
    with torch.no_grad():
        full = gemma.generate(ids, **NEW)
        with dashkv.enable(gemma, encoders, DashKVConfig.full(dense_layers=())):
            hashed = gemma.generate(ids, past_key_values=cache, **NEW)
    assert torch.equal(hashed, full)
    assert [type(layer) for layer in cache.layers] == [
        DynamicSlidingWindowLayer if i in SLIDING else DashKVLayer for i in range(len(LAYER_TYPES))
    ]


@pytest.mark.slow
def test_the_shipped_gemma_encoders_are_found_by_identity_and_beat_random_projection():
    """The encoders shipped for Gemma-3-270M: found for the real model by its fingerprint, trained on
    the global layers only, and through the tiers (``dense_below=0``) the next-token distribution after
    a 2K-token context is much closer to full attention's than with random projections."""
    from dashkv.corpus import text
    from dashkv.encoders import model_fingerprint
    from dashkv.models import GEMMA_MODEL
    from dashkv.shipped import shipped_encoders

    model, tokenizer = dashkv.load_model(GEMMA_MODEL)
    encoders = shipped_encoders(model)
    assert encoders.fingerprint == model_fingerprint(model)
    global_layers = [i for i, kind in enumerate(model.config.layer_types) if kind == "full_attention"]
    untouched = HashEncoders.random(model, bits=encoders.bits, seed=0)
    for layer in range(model.config.num_hidden_layers):
        trained = not torch.equal(encoders.layers[layer].key_proj, untouched.layers[layer].key_proj.half().float())
        assert trained == (layer in global_layers), layer
    ids = tokenizer(text("eval")[:20000], return_tensors="pt").input_ids[:, :2048]
    context, block = ids[:, :-32], ids[:, -32:]  # the block's queries go through the tiers
    config = DashKVConfig(bits=encoders.bits, dense_below=0)

    def next_token_kl(with_encoders):
        cache = DashKVCache(with_encoders, config.dense_layers, config=model.config)
        with torch.no_grad(), dashkv.enable(model, with_encoders, config):
            model(context, past_key_values=cache)
            hashed = model(block, past_key_values=cache).logits[0].log_softmax(-1)
        return torch.nn.functional.kl_div(hashed, full, log_target=True, reduction="batchmean").item()

    with torch.no_grad():
        full = model(ids).logits[0, -32:].log_softmax(-1)
    shipped, random = next_token_kl(encoders), next_token_kl(untouched)
    assert shipped < 0.5 * random, (shipped, random)
