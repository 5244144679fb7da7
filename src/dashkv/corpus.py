"""Real English prose that every Python installation carries, for calibration and evaluation.

Source: the "topics" of the Python Language Reference in CPython's ``pydoc_data.topics`` (the text
``help()`` shows; Python Software Foundation License). Only prose paragraphs are kept: grammar
blocks, code samples and heading rules are dropped. Topics are split by their sorted index, even for
``"train"`` and odd for ``"eval"``; repeated paragraphs are kept once, and the held-out split drops
any paragraph the training split has, so the encoders never train on the text they are judged on.
"""

from __future__ import annotations

import re
from functools import lru_cache

SPLITS = ("train", "eval")


def _prose_paragraphs(text: str) -> list[str]:
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue  # indented: code, grammar or a table
        if re.fullmatch(r"[*=\-^~]+", lines[-1].strip()):
            continue  # a heading and its underline
        paragraph = " ".join(line.strip() for line in lines)
        if len(paragraph) >= 80 and not re.search(r"::=|\+---|\|", paragraph) and not paragraph.startswith((">>>", "*")):
            paragraphs.append(paragraph)
    return paragraphs


@lru_cache(maxsize=None)
def paragraphs(split: str) -> tuple[str, ...]:
    """Prose paragraphs of one split, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not known; choose one of {SPLITS}")
    from pydoc_data.topics import topics

    names = sorted(topics)
    train = tuple(dict.fromkeys(p for name in names[0::2] for p in _prose_paragraphs(topics[name])))
    if split == "train":
        return train
    # some paragraphs stand in several topics: the held-out split drops any that training saw
    seen = set(train)
    return tuple(p for p in dict.fromkeys(p for name in names[1::2] for p in _prose_paragraphs(topics[name])) if p not in seen)


def text(split: str) -> str:
    """All prose of one split, paragraphs separated by blank lines."""
    return "\n\n".join(paragraphs(split))
