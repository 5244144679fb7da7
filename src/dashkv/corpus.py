"""Real English prose that every Python installation carries, for calibration and evaluation.

Two sources, both under the Python Software Foundation License:

- the "topics" of the Python Language Reference in CPython's ``pydoc_data.topics`` (the text
  ``help()`` shows). Topics are split by their sorted index, even for ``"train"`` and odd for
  ``"eval"``;
- the docstrings of the standard library's own modules, classes and functions (its ``.py`` sources,
  tests and GUI packages left out), for ``"train"`` only: the topics alone give about 25K training
  tokens, and encoders trained on that little text fit it and generalise worse; the docstrings add
  about 100K.

Only prose paragraphs are kept: grammar blocks, code samples, doctests and heading rules are dropped.
Repeated paragraphs are kept once, and the held-out split drops any paragraph the training split has,
so the encoders never train on the text they are judged on.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

SPLITS = ("train", "eval")
# stdlib folders whose docstrings are not prose about the library (tests, GUI, legacy tools)
SKIPPED_PACKAGES = ("test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages", "dist-packages")


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


def _topic_paragraphs(parity: int) -> list[str]:
    from pydoc_data.topics import topics

    names = sorted(topics)[parity::2]
    return [p for name in names for p in _prose_paragraphs(topics[name])]


def _docstring_paragraphs() -> list[str]:
    """Prose of the standard library's docstrings, in a fixed order (sorted files, then source order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paragraphs = []
    for path in sorted(root.rglob("*.py")):
        if any(part in SKIPPED_PACKAGES for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately invalid or not UTF-8
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                paragraphs.extend(_prose_paragraphs(ast.get_docstring(node) or ""))
    return paragraphs


@lru_cache(maxsize=None)
def paragraphs(split: str) -> tuple[str, ...]:
    """Prose paragraphs of one split, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not known; choose one of {SPLITS}")
    train = tuple(dict.fromkeys(_topic_paragraphs(0) + _docstring_paragraphs()))
    if split == "train":
        return train
    # some paragraphs stand in several topics: the held-out split drops any that training saw
    seen = set(train)
    return tuple(p for p in dict.fromkeys(_topic_paragraphs(1)) if p not in seen)


def text(split: str) -> str:
    """All prose of one split, paragraphs separated by blank lines."""
    return "\n\n".join(paragraphs(split))
