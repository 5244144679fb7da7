"""RULER common-words extraction (CWE): a numbered list of words in which a few appear far more often
than the rest; the question asks for the most common ones.

The list is the haystack (as in RULER). On SmolLM2-135M full attention does not solve it at 1K-2K,
so it is built and screened but not kept in the default suites.
"""

from __future__ import annotations

import random

from dashkv.eval.tasks.sample import WORDS, TaskSample

INSTRUCTION = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)
QUESTION = "What are the {n} most common words in the above list?"
PREFIX = "Answer: The top {n} words that appear most often in the list are: "


def common_words(tokenizer, num_tokens: int, seed: int, common: int = 3, common_freq: int = 20, rare_freq: int = 2) -> TaskSample:
    """``common`` words ``common_freq`` times each among other words ``rare_freq`` times each (~5 tokens
    a numbered entry), shuffled; answer lists the common words in order of first appearance."""
    rng = random.Random(seed)
    pool = list(WORDS)
    rng.shuffle(pool)
    frequent, rare = pool[:common], pool[common:]
    entries = [w for w in frequent for _ in range(common_freq)]
    slots = max(0, (num_tokens - 80) // 5 - len(entries))
    entries += [rare[i % len(rare)] for i in range(min(slots, len(rare) * rare_freq))]
    rng.shuffle(entries)
    context = INSTRUCTION + "\n\n" + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
    ordered = sorted(frequent, key=entries.index)
    question = "\n\n" + QUESTION.format(n=common) + "\n" + PREFIX.format(n=common)
    return TaskSample("common_words", seed, context, question, ", ".join(ordered) + ".", tuple(ordered), {})
