"""The tokenizer rebuilt from a GGUF SentencePiece vocabulary equals a readable reimplementation of
llama.cpp's SPM tokenizer (tests/spm_reference.py), and decodes back to the text."""

import random

import pytest
from spm_reference import spm_reference

from dashkv.gguf_tokenizer import BYTE, CONTROL, NORMAL, SPACE, USER_DEFINED, SpmVocab, build_tokenizer, hf_tokenizer

# normal pieces with their scores: merges by score, not by order of appearance, decide the result
PIECES = {
    "a": -1, "b": -2, "c": -3, "d": -4, "p": -5, "i": -6, "t": -7, "l": -8, SPACE: -9,
    "ab": -30, "bc": -10, "ca": -12, "cap": -15, "it": -11, "al": -13, "ital": -14, "capital": -16,
    SPACE + "c": -40, SPACE + "capital": -17, "da": -25, "dab": -50, "aa": -26, "aaa": -27,
}  # fmt: skip


def small_vocab() -> SpmVocab:
    tokens, scores, types = [], [], []
    for piece, kind in [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", 2),
                        ("\n", USER_DEFINED), ("\n\n", USER_DEFINED), ("  ", USER_DEFINED), ("<b>", USER_DEFINED)]:  # fmt: skip
        tokens.append(piece), scores.append(-1000.0), types.append(kind)
    for b in range(256):
        tokens.append(f"<0x{b:02X}>"), scores.append(0.0), types.append(BYTE)
    for piece, score in PIECES.items():
        tokens.append(piece), scores.append(float(score)), types.append(NORMAL)
    return SpmVocab(tokens, scores, types, bos_id=2, eos_id=1, unk_id=3, pad_id=0, add_bos=True)


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdptil") + [" ", " ", "\n", "é", "€", "\U0001f600", "x"] + ["capital", "<b>", "  "]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def vocab():
    return small_vocab()


def test_ids_equal_the_spm_reference_and_round_trip(vocab):
    tokenizer = build_tokenizer(vocab)
    for text in random_texts(400) + ["capital", " capital", "abc", "dabc", "aaaa", "a  b\n\n\nc"]:
        ids = tokenizer.encode(text).ids
        assert ids == spm_reference(text, vocab), text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_highest_score_merge_wins_not_the_leftmost_pair(vocab):
    tokenizer = build_tokenizer(vocab)
    # bc (-10) merges before the leftmost pair ab (-30): a BPE ranked by position would give [ab, c]
    assert tokenizer.encode("abc").tokens == ["<bos>", "a", "bc"]
    assert tokenizer.encode("dabc").tokens == ["<bos>", "da", "bc"]
    assert tokenizer.encode(" capital").tokens == ["<bos>", SPACE + "capital"]
    # a character that is no piece falls back to its UTF-8 bytes
    assert tokenizer.encode("é").tokens == ["<bos>", "<0xC3>", "<0xA9>"]


def test_special_and_user_defined_pieces_are_split_out_first(vocab):
    tokenizer = build_tokenizer(vocab)
    assert tokenizer.encode("a\n\nb  c<b>").tokens == ["<bos>", "a", "\n\n", "b", "  ", "c", "<b>"]
    assert tokenizer.encode("<eos>a").ids == [2, 1, vocab.tokens.index("a")]


def test_transformers_wrapper_keeps_ids_and_specials(vocab, tmp_path):
    from transformers import AutoTokenizer

    hf_tokenizer(vocab).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "capital  d\nabc"
    assert loaded(text).input_ids == spm_reference(text, vocab)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (2, 1, 0)
    assert loaded.decode(loaded(text).input_ids, skip_special_tokens=True) == text


def test_inconsistent_vocabularies_are_refused():
    with pytest.raises(ValueError, match="one entry per token"):
        SpmVocab(["a", "b"], [0.0], [NORMAL, NORMAL])
    with pytest.raises(ValueError, match="unique"):
        SpmVocab(["a", "a"], [0.0, 0.0], [NORMAL, NORMAL])


@pytest.mark.slow
def test_gemma_tokenizer_equals_the_reference_on_prose_and_round_trips(tmp_path):
    """The real Gemma-3-270M vocabulary (assembled from the chunk packages) on the whole corpus."""
    import dashkv
    from dashkv.corpus import text
    from dashkv.gguf_tokenizer import read_spm_vocab
    from dashkv.models import GEMMA_MODEL, assemble_gemma_gguf

    vocab = read_spm_vocab(assemble_gemma_gguf(tmp_path))
    _, tokenizer = dashkv.load_model(GEMMA_MODEL)
    assert tokenizer.tokenize("The capital") == ["The", SPACE + "capital"]
    prose = text("eval")
    for start in range(0, 60_000, 5_000):
        piece = prose[start : start + 5_000]
        assert tokenizer(piece).input_ids == spm_reference(piece, vocab)
    corpus = "".join(text(split) for split in ("train", "eval"))
    ids = tokenizer(corpus, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == corpus
