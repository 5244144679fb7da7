"""Training on planted structure: q.k depends only on 4 of 16 dimensions, and the keys carry large
noise in the other 12, so random projections rank keys badly; learned codes must find the signal."""

import json
import math
import shutil

import pytest
import torch

from dashkv import HashEncoders
from dashkv.training.collect import LayerSignals
from dashkv.training.quality import recall_at, recalls_at, teacher_probs
from dashkv.ops.reference import expand_kv
from dashkv.training.train import (
    TrainConfig,
    fit_mid_tier,
    grouped_scores,
    sample_keys,
    tiered_log_probs,
    train_layer_codes,
    whitened_start,
)


def _planted(seed, sequences=4, length=256, queries=48, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    sig = LayerSignals()
    for _ in range(sequences):
        keys = torch.randn(2, length, 16, generator=gen)
        keys[..., 4:] *= 6.0
        q = torch.randn(6, queries, 16, generator=gen) * 3.0
        q[..., 4:] = 0.0
        sig.keys.append(keys.to(device))
        sig.queries.append(q.to(device))
        sig.positions.append(torch.randint(128, length, (queries,), generator=gen).sort().values.to(device))
    return sig


def test_training_beats_random_on_planted_structure(tiny_qwen2, device):
    cfg = TrainConfig(bits=32, steps=150, lr=1e-2, seq_len=256, min_position=128, sinks=2, window=8)
    encoder = HashEncoders.random(tiny_qwen2, bits=32, seed=0).layers[0].to(device)
    random = HashEncoders.random(tiny_qwen2, bits=32, seed=0).layers[0].to(device)
    train, held_out = _planted(0, device=device), _planted(1, device=device)

    def recall(enc):
        return sum(recall_at(enc, q, k, p, 0.05, 2, 8, 0.25)
                   for k, q, p in zip(held_out.keys, held_out.queries, held_out.positions)) / 4

    before = recall(random)
    short = train_layer_codes(HashEncoders.random(tiny_qwen2, bits=32, seed=0).layers[0].to(device), train,
                              TrainConfig(**{**cfg.__dict__, "steps": 10}), 0.25, torch.Generator().manual_seed(0))
    final = train_layer_codes(encoder, train, cfg, 0.25, torch.Generator().manual_seed(0))
    assert final < short  # the loss goes down with training
    after = recall(encoder)
    oracle = recall(None)
    assert after > before + 0.2, (before, after, oracle)


def test_training_is_deterministic_under_a_seed(tiny_qwen2):
    cfg = TrainConfig(bits=32, steps=5, seq_len=256, min_position=128, sinks=2, window=8)
    runs = []
    for _ in range(2):
        enc = HashEncoders.random(tiny_qwen2, bits=32, seed=0).layers[0]
        train_layer_codes(enc, _planted(0, sequences=2), cfg, 0.25, torch.Generator().manual_seed(3))
        runs.append(enc.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_whitened_start_leaves_the_relaxed_codes_unsaturated(tiny_qwen2):
    # signals with large, uneven scales, as post-RoPE q/k have: unscaled projections would saturate tanh
    sig = _planted(0)
    keys, queries, _ = sig.stacked()
    keys, queries = keys * 5.0 + 3.0, queries * 20.0
    encoder = HashEncoders.random(tiny_qwen2, bits=32, seed=0).layers[0]
    whitened_start(encoder, keys, queries)
    with torch.no_grad():
        key_v, query_v = encoder.key_projection(keys), encoder.query_projection(queries)
    for v in (key_v, query_v):
        assert torch.allclose(v.std(dim=(0, 2)), torch.ones(()), atol=1e-3)
        assert (torch.tanh(v).abs() < 0.9).float().mean() > 0.5  # most relaxed codes still have a gradient
    assert torch.allclose(key_v.mean(dim=(0, 2)), torch.zeros(()), atol=0.2)  # centred keys: balanced bits


def test_fit_mid_tier_makes_tiered_attention_match_the_teacher(tiny_qwen2):
    # temperature 0 flattens every mid estimate onto the high tier's mean logit: the mid tier takes
    # far more mass than the teacher gives it, and the fit must take it back
    cfg = TrainConfig(bits=32, seq_len=256, min_position=128, sinks=2, window=8, stage2_steps=60)
    signals = _planted(0)
    for keys, queries in zip(signals.keys, signals.queries):  # isotropic: random codes estimate q.k
        keys[..., 4:] /= 6.0
        queries[..., 4:] = torch.randn(queries[..., 4:].shape, generator=torch.Generator().manual_seed(1)) * 3.0
    encoder = HashEncoders.random(tiny_qwen2, bits=32, seed=0).layers[0]
    with torch.no_grad():
        encoder.mid_temperature.zero_()

    def kl():
        with torch.no_grad():
            total = 0.0
            for i in range(len(signals.keys)):
                student, teacher = tiered_log_probs(encoder, signals, i, cfg, 0.25)
                p = teacher.exp()
                total += float(torch.where(teacher.isfinite(), p * (teacher - student), torch.zeros_like(p)).sum(-1).mean())
            return total / len(signals.keys)

    student, teacher = tiered_log_probs(encoder, signals, 0, cfg, 0.25)
    assert torch.equal(student.isfinite(), teacher.isfinite())  # both over the same kept keys
    before = kl()
    fit_mid_tier(encoder, signals, cfg, 0.25)
    assert kl() < 0.65 * before, (before, kl())  # 1.35 -> 0.75; the estimate of 32 random bits is noisy
    assert (encoder.mid_temperature > 0).all()


def test_training_takes_sequences_of_different_lengths(tiny_qwen2):
    # 2K windows plus a few 8K ones in the real run; here 256 and 512 keys
    cfg = TrainConfig(bits=32, steps=40, seq_len=256, min_position=128, sinks=2, window=8)
    signals = _planted(0, sequences=3)
    signals.extend(_planted(1, sequences=1, length=512))
    encoder = HashEncoders.random(tiny_qwen2, bits=32, seed=0).layers[0]
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    loss = train_layer_codes(encoder, signals, cfg, 0.25, torch.Generator().manual_seed(0))
    assert math.isfinite(loss)
    assert not torch.equal(before["key_proj"], encoder.state_dict()["key_proj"])


def test_grouped_scores_equal_the_scores_against_keys_copied_per_query_head():
    torch.manual_seed(0)
    for heads, kv_heads in ((9, 3), (8, 8), (8, 1)):
        queries, keys = torch.randn(heads, 5, 16), torch.randn(kv_heads, 11, 16)
        want = queries @ expand_kv(keys.unsqueeze(0), heads)[0].transpose(-1, -2)
        torch.testing.assert_close(grouped_scores(queries, keys), want)


def test_sample_keys_keeps_columns_aligned_and_drops_queries_left_without_keys():
    keys = torch.arange(10.0).view(1, 1, 10, 1).expand(1, 2, 10, 3)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :8], mask[1, 9] = True, True  # query 1 sees one key; query 2 none
    rows = torch.tensor([5, 6, 7])
    sub_keys, sub_mask, sub_rows = sample_keys(keys, mask, rows, 4, torch.Generator().manual_seed(0))
    cols = sub_keys[0, 0, :, 0].long()
    assert sub_keys.shape == (1, 2, 4, 3) and cols.unique().numel() == 4
    kept = [i for i in range(3) if mask[i, cols].any()]
    assert torch.equal(sub_rows, rows[kept]) and torch.equal(sub_mask, mask[kept][:, cols])
    assert sample_keys(keys, mask, rows, 10, torch.Generator())[0] is keys  # short sequences: all keys


def test_recalls_at_several_budgets_equal_one_budget_at_a_time(tiny_qwen2):
    encoder = HashEncoders.random(tiny_qwen2, bits=32, seed=0).layers[0]
    signals = _planted(0)
    k, q, p = signals.keys[0], signals.queries[0], signals.positions[0]
    probs = teacher_probs(q, k, p, 0.25)
    for enc in (None, encoder):
        several = recalls_at(enc, q, k, p, (0.05, 0.3, 0.1), 2, 8, probs)
        assert several == [recall_at(enc, q, k, p, f, 2, 8, 0.25) for f in (0.05, 0.3, 0.1)]
        assert several[0] <= several[2] <= several[1]  # selections are nested


def test_recall_follows_the_tier_sharing(tiny_qwen2):
    """The recall of ``share="group"`` is that of one selection per KV head by each key's nearest query
    head (the reference's), and ``"union"``'s at least per-head's (every head keeps its own keys)."""
    from dashkv.ops import reference as ref
    from dashkv.training.quality import eligible_mask, mass_recall

    encoder = HashEncoders.random(tiny_qwen2, bits=32, seed=0).layers[0]
    signals = _planted(0)
    k, q, p = signals.keys[0], signals.queries[0], signals.positions[0]
    head, group, union = (recall_at(encoder, q, k, p, 0.1, 2, 8, 0.25, share) for share in ("head", "group", "union"))
    assert union >= head and group != head
    eligible = eligible_mask(p, k.shape[1], 2, 8)[None, None]
    dist = ref.group_distance(ref.hamming_distance(encoder.encode_query(q[None]), encoder.encode_key(k[None])[0]), 2)
    chosen = ref.select_smallest(dist, eligible, ref.budget_counts(eligible.sum(-1), 0.1), 0, 32)
    expected = mass_recall(teacher_probs(q, k, p, 0.25), expand_kv(chosen, 6)[0], eligible[0].expand(6, -1, -1))
    assert group == pytest.approx(float(expected), abs=1e-6)


def _train_all(model, tmp_path, workers, name, resume_from=None):
    from dashkv.training.collect import collect
    from dashkv.training.train import train_encoders

    windows = [torch.randint(0, 97, (256,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    signals = collect(model, windows, 16, 128, seed=0)
    cfg = TrainConfig(bits=32, steps=6, seq_len=256, min_position=128, sinks=2, window=8, stage2_steps=2,
                      dense_layers=(), layer_workers=workers)
    out = tmp_path / name
    if resume_from is not None:
        shutil.copytree(resume_from, out / "checkpoint")
    return train_encoders(model, signals, cfg, out).state_dict(), out


def test_layers_trained_side_by_side_equal_layers_trained_one_by_one(tiny_qwen2, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread in both runs: the same float summation order
    try:
        serial, _ = _train_all(tiny_qwen2, tmp_path, 1, "serial")
        parallel, out = _train_all(tiny_qwen2, tmp_path, 3, "parallel")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(serial[k], parallel[k]) for k in serial)
    layers = json.loads((out / "training.json").read_text())["layers"]
    assert list(layers) == ["0", "1", "2"]


def test_workers_leave_the_callers_thread_settings_as_they_were(tiny_qwen2, tmp_path):
    import numba

    threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(2)
    try:
        _train_all(tiny_qwen2, tmp_path, 2, "two")  # each worker runs on 1 thread
        assert torch.get_num_threads() == 2
        assert numba.get_num_threads() == numba_threads
    finally:
        torch.set_num_threads(threads)


def test_resume_restarts_a_layer_left_half_trained_in_the_checkpoint(tiny_qwen2, tmp_path):
    full, _ = _train_all(tiny_qwen2, tmp_path, 1, "full")
    # a checkpoint written while a worker was inside layer 1: layer 0 done, layer 1's weights moved
    encoders = HashEncoders.random(tiny_qwen2, bits=32, seed=0)
    encoders.load_state_dict(full)
    with torch.no_grad():
        for p in encoders.layers[1].parameters():
            p.add_(1.0)
    checkpoint = tmp_path / "ckpt"
    encoders.save_pretrained(checkpoint)
    (checkpoint / "progress.json").write_text(json.dumps({"0": {"distill_loss": 0.0}}))
    resumed, _ = _train_all(tiny_qwen2, tmp_path, 1, "resumed", resume_from=checkpoint)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_resume_refuses_a_checkpoint_of_other_bits(tiny_qwen2, tmp_path):
    checkpoint = tmp_path / "ckpt"
    HashEncoders.random(tiny_qwen2, bits=64, seed=0).save_pretrained(checkpoint)
    (checkpoint / "progress.json").write_text("{}")
    with pytest.raises(ValueError, match="bits=32"):
        _train_all(tiny_qwen2, tmp_path, 1, "other", resume_from=checkpoint)
