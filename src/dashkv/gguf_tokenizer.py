"""A fast tokenizer rebuilt from the SentencePiece vocabulary stored in a GGUF file.

transformers 5.2 converts the tokenizer of some GGUF files wrongly (Gemma-3-270M: "capital" becomes
``▁c ap it al``, and the loss on prose triples). This module builds one from the GGUF's own pieces,
scores and token types with the semantics of llama.cpp's SentencePiece (SPM) tokenizer:

- special (control, unknown) and user-defined pieces are split out of the raw text first, as added
  tokens (Gemma's newline runs and space runs are user-defined pieces);
- the rest has its spaces replaced by ``▁`` and starts as single characters; then the adjacent pair
  whose concatenation is a piece with the highest score is merged, again and again, ties to the left;
- a character that is no piece becomes its UTF-8 bytes (``<0xNN>`` pieces: byte fallback).

The merge rule maps onto a BPE model of the ``tokenizers`` library: every split ``(left, right)`` of
a normal piece into two normal pieces is a merge, ranked by the score of the merged piece.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# llama.cpp's token types (gguf ``tokenizer.ggml.token_type``)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # ▁


@dataclass
class SpmVocab:
    """A SentencePiece vocabulary as GGUF stores it.

    ``tokens[i]``, ``scores[i]`` and ``types[i]`` describe token id ``i``; the ids are optional.
    """

    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False

    def __post_init__(self) -> None:
        if not (len(self.tokens) == len(self.scores) == len(self.types)):
            raise ValueError(
                f"tokens, scores and types must have one entry per token; got {len(self.tokens)}, "
                f"{len(self.scores)}, {len(self.types)}"
            )
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("tokens must be unique strings (a piece text names one id)")


def read_spm_vocab(gguf_path: str | Path) -> SpmVocab:
    """The SentencePiece vocabulary of a GGUF file (``tokenizer.ggml.model == "llama"``)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))

    def field(name: str, default=None):
        entry = reader.fields.get(name)
        return default if entry is None else entry.contents()

    model = field("tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(f"{gguf_path}: tokenizer.ggml.model={model!r}; only SentencePiece ('llama') is supported")
    if field("tokenizer.ggml.add_space_prefix", False):
        raise ValueError(f"{gguf_path}: tokenizer.ggml.add_space_prefix=True is not supported (Gemma has False)")
    return SpmVocab(
        tokens=list(field("tokenizer.ggml.tokens")),
        scores=[float(s) for s in field("tokenizer.ggml.scores")],
        types=[int(t) for t in field("tokenizer.ggml.token_type")],
        bos_id=field("tokenizer.ggml.bos_token_id"),
        eos_id=field("tokenizer.ggml.eos_token_id"),
        unk_id=field("tokenizer.ggml.unknown_token_id"),
        pad_id=field("tokenizer.ggml.padding_token_id"),
        add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(field("tokenizer.ggml.add_eos_token", False)),
    )


def spm_merges(vocab: SpmVocab) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best merged-piece score first.

    Merging the lowest-ranked adjacent pair (what BPE does) is then merging the pair whose merged
    piece scores highest (what SPM does); BPE breaks equal ranks to the left, as SPM does.
    """
    normal = {t for t, kind in zip(vocab.tokens, vocab.types) if kind == NORMAL}
    ranked = []
    for piece_id, (piece, kind) in enumerate(zip(vocab.tokens, vocab.types)):
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-vocab.scores[piece_id], piece_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(vocab: SpmVocab):
    """A ``tokenizers.Tokenizer`` with SPM semantics (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    bytes_ok = all(f"<0x{b:02X}>" in vocab.tokens for b in range(256))
    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(vocab.tokens)}, merges=spm_merges(vocab), unk_token=unk,
        byte_fallback=bytes_ok, fuse_unk=False,
    )  # fmt: skip
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    added = [
        AddedToken(t, special=kind in (CONTROL, UNKNOWN), normalized=False)
        for t, kind in zip(vocab.tokens, vocab.types)
        if kind in (CONTROL, UNKNOWN, USER_DEFINED)
    ]
    tokenizer.add_tokens(added)  # ids are the vocabulary's own: every added piece is in it
    bos = vocab.tokens[vocab.bos_id] if vocab.add_bos and vocab.bos_id is not None else None
    eos = vocab.tokens[vocab.eos_id] if vocab.add_eos and vocab.eos_id is not None else None
    if bos or eos:
        head, tail = (f"{bos} " if bos else ""), (f" {eos}" if eos else "")
        specials = [(t, vocab.tokens.index(t)) for t in (bos, eos) if t]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{head}$A{tail}", pair=f"{head}$A{tail} $B{tail}", special_tokens=specials
        )
    return tokenizer


def hf_tokenizer(vocab: SpmVocab):
    """The tokenizer as a transformers ``PreTrainedTokenizerFast`` (save it with ``save_pretrained``)."""
    from transformers import PreTrainedTokenizerFast

    def name(token_id: int | None) -> str | None:
        return vocab.tokens[token_id] if token_id is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(vocab), bos_token=name(vocab.bos_id), eos_token=name(vocab.eos_id),
        unk_token=name(vocab.unk_id), pad_token=name(vocab.pad_id), clean_up_tokenization_spaces=False,
    )  # fmt: skip
