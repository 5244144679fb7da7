"""A readable reimplementation of llama.cpp's SentencePiece (SPM) tokenizer, the reference the fast
GGUF tokenizer is tested against. It follows llama.cpp (``llm_tokenizer_spm`` and
``tokenizer_st_partition``), not the fast tokenizer's code: no merge list, scores looked up directly.
"""

from __future__ import annotations

import heapq

from dashkv.gguf_tokenizer import BYTE, CONTROL, SPACE, UNKNOWN, USER_DEFINED, SpmVocab


def partition(text: str, specials: list[str]) -> list[str | int]:
    """Split special and user-defined pieces out of the raw text, longest piece first (as llama.cpp
    does); returns raw fragments (str) and piece indices into ``specials`` (int)."""
    fragments: list[str | int] = [text]
    for index in sorted(range(len(specials)), key=lambda i: -len(specials[i])):
        piece, split = specials[index], []
        for fragment in fragments:
            if not isinstance(fragment, str):
                split.append(fragment)
                continue
            parts = fragment.split(piece)
            for k, part in enumerate(parts):
                if k:
                    split.append(index)
                if part:
                    split.append(part)
        fragments = split
    return fragments


def spm_fragment(text: str, ids: dict[str, int], scores: list[float]) -> list[int]:
    """Tokenize one raw fragment: spaces to ▁, characters, best-scoring adjacent merges, byte fallback."""
    symbols = list(text.replace(" ", SPACE))
    alive = [True] * len(symbols)
    nxt = list(range(1, len(symbols))) + [-1]
    prv = list(range(-1, len(symbols) - 1))
    queue: list[tuple[float, int, int, str]] = []

    def push(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        merged = symbols[left] + symbols[right]
        if merged in ids:  # highest score first, then the leftmost pair
            heapq.heappush(queue, (-scores[ids[merged]], left, right, merged))

    for i in range(len(symbols) - 1):
        push(i, i + 1)
    while queue:
        _, left, right, merged = heapq.heappop(queue)
        # a stale entry: one side was merged away or grew since the pair was queued
        if not (alive[left] and alive[right]) or nxt[left] != right or symbols[left] + symbols[right] != merged:
            continue
        symbols[left], alive[right] = merged, False
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        push(prv[left], left)
        push(left, nxt[left])
    out = []
    for symbol, live in zip(symbols, alive):
        if not live:
            continue
        if symbol in ids:
            out.append(ids[symbol])
        else:
            out.extend(ids[f"<0x{b:02X}>"] for b in symbol.encode("utf-8"))
    return out


def spm_reference(text: str, vocab: SpmVocab, add_bos: bool | None = None) -> list[int]:
    """Token ids of ``text`` the way llama.cpp's SPM tokenizer makes them (special pieces parsed)."""
    special_ids = [i for i, kind in enumerate(vocab.types) if kind in (CONTROL, UNKNOWN, USER_DEFINED)]
    specials = [vocab.tokens[i] for i in special_ids]
    # llama.cpp's lookup table holds every piece; byte pieces only through the fallback
    ids = {t: i for i, (t, kind) in enumerate(zip(vocab.tokens, vocab.types)) if kind != BYTE}
    ids.update({t: i for i, (t, kind) in enumerate(zip(vocab.tokens, vocab.types)) if kind == BYTE})
    out = [vocab.bos_id] if (vocab.add_bos if add_bos is None else add_bos) else []
    for fragment in partition(text, specials):
        out.extend(spm_fragment(fragment, ids, vocab.scores) if isinstance(fragment, str) else [special_ids[fragment]])
    return out
