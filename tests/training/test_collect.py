import pytest
import torch

from dashkv.training.collect import collect, read_corpus, sample_positions, token_windows
from dashkv.training.quality import teacher_probs


def test_random_offsets_rotate_vectors_but_keep_the_teacher(tiny_qwen2):
    ids = [torch.randint(3, 97, (96,), generator=torch.Generator().manual_seed(0))]
    plain = collect(tiny_qwen2, ids, 16, 32, seed=0)
    shifted = collect(tiny_qwen2, ids, 16, 32, seed=0, max_position=512)
    assert set(plain) == {0, 1, 2}
    for layer in plain:
        a, b = plain[layer], shifted[layer]
        assert torch.equal(a.positions[0], b.positions[0])
        assert not torch.allclose(a.keys[0], b.keys[0])  # post-RoPE vectors moved ...
        pa = teacher_probs(a.queries[0], a.keys[0], a.positions[0], 0.25)
        pb = teacher_probs(b.queries[0], b.keys[0], b.positions[0], 0.25)
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-5)  # ... the attention did not
    assert tiny_qwen2.config._attn_implementation == "sdpa"


def test_natural_share_leaves_that_share_of_sequences_at_positions_from_zero(tiny_qwen2):
    ids = [torch.randint(3, 97, (48,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    plain = collect(tiny_qwen2, ids, 8, 16, seed=0)[0]
    natural = collect(tiny_qwen2, ids, 8, 16, seed=0, max_position=512, natural_share=1.0)[0]
    mixed = collect(tiny_qwen2, ids, 8, 16, seed=0, max_position=512, natural_share=0.5)[0]
    assert all(torch.equal(a, b) for a, b in zip(plain.keys, natural.keys))
    at_zero = [any(torch.equal(m, a) for a in plain.keys) for m in mixed.keys]
    assert 0 < sum(at_zero) < len(ids)  # some sequences kept their positions, the others moved


def test_bfloat16_teacher_stores_float32_vectors_close_to_the_float32_teacher(tiny_qwen2):
    ids = [torch.randint(3, 97, (96,), generator=torch.Generator().manual_seed(0))]
    exact = collect(tiny_qwen2, ids, 16, 32, seed=0)
    fast = collect(tiny_qwen2, ids, 16, 32, seed=0, bfloat16=True)
    for layer in exact:
        a, b = exact[layer], fast[layer]
        assert b.keys[0].dtype == b.queries[0].dtype == torch.float32
        assert not torch.equal(a.keys[0], b.keys[0])  # the forward did run in bf16 ...
        pa = teacher_probs(a.queries[0], a.keys[0], a.positions[0], 0.25)
        pb = teacher_probs(b.queries[0], b.keys[0], b.positions[0], 0.25)
        assert 0.5 * (pa - pb).abs().sum(-1).mean() < 0.02  # ... and the teacher barely moved


def test_sample_positions_and_windows():
    gen = torch.Generator().manual_seed(0)
    pos = sample_positions(100, 10, 40, gen)
    assert pos.numel() == 10 and pos.min() >= 40 and pos.max() < 100 and torch.equal(pos, pos.sort().values)
    with pytest.raises(ValueError, match="no query position"):
        sample_positions(10, 5, 20, gen)


def test_read_corpus_plain_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n\n{"text": "second"}\n')
    assert read_corpus([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == "plain text\n\nfirst\n\nsecond"
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="c.jsonl:1"):
        read_corpus([tmp_path / "c.jsonl"])
    with pytest.raises(FileNotFoundError):
        read_corpus([tmp_path / "missing.txt"])


def test_token_windows_cut_and_refuse_short_text(default_model):
    _, tok = default_model
    windows = token_windows(tok, "word " * 300, 64)
    assert len(windows) >= 4 and all(w.numel() == 64 for w in windows)
    ids = torch.tensor(tok("word " * 300, add_special_tokens=False).input_ids)
    assert torch.equal(torch.cat(windows), ids[: 64 * len(windows)])  # consecutive, from the start
    overlapping = token_windows(tok, "word " * 300, 64, stride=16)
    assert torch.equal(overlapping[1][:48], overlapping[0][16:]) and len(overlapping) > 3 * len(windows)
    spread = token_windows(tok, " ".join(str(i) for i in range(400)), 64, count=3)
    whole = token_windows(tok, " ".join(str(i) for i in range(400)), 64)
    assert len(spread) == 3 and torch.equal(spread[0], whole[0]) and torch.equal(spread[2], whole[2 * len(whole) // 3])
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(tok, "short", 64)
