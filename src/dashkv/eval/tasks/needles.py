"""RULER-style needle retrieval in real text: multi-key, multi-value and multi-query.

One fixed format for every task and every method, the one under which full attention on SmolLM2-135M
succeeds (see :mod:`dashkv.eval.tasks.passkey`): each needle its own paragraph between blank lines, an
instruction before the text, the question after it, and an answer prefix that ends in a space.

- multi-key: ``keys`` needles "One of the special magic numbers for <word> is: <number>." with
  different words; the question asks for one of them (the others are distractors).
- multi-value: ``values`` needles with the same word and different numbers; all must be listed, in
  the order they appear.
- multi-query: ``keys`` needles with different words; the question asks for two of them.
"""

from __future__ import annotations

import random

from dashkv.eval.tasks.passkey import haystack
from dashkv.eval.tasks.sample import TaskSample, distinct_words, magic_number

INSTRUCTION = (
    "Some special magic numbers are hidden inside a lot of irrelevant text. Find them and memorize them. "
    "I will quiz you about the numbers afterwards."
)
NEEDLE = "One of the special magic numbers for {word} is: {number}."
ONE_QUESTION = "What is the special magic number for {word} mentioned in the provided text?"
ONE_PREFIX = "The special magic number for {word} mentioned in the provided text is "
MANY_QUESTION = "What are all the special magic numbers for {word} mentioned in the provided text?"
MANY_PREFIX = "The special magic numbers for {word} mentioned in the provided text are "
TWO_QUESTION = "What are the special magic numbers for {a} and for {b} mentioned in the provided text?"
TWO_PREFIX = "The special magic number for {a} is "


def _place(tokenizer, num_tokens: int, rng: random.Random, needles: list[str]) -> tuple[str, list[float]]:
    """Real-text paragraphs with each needle as its own paragraph at a random depth in ``[0.05, 0.95]``."""
    budget = num_tokens - 40 - 25 * len(needles)
    blocks = haystack(tokenizer, budget, rng)
    depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
    positions = [round(d * len(blocks)) for d in depths]
    for offset, (position, needle) in enumerate(zip(positions, needles)):
        blocks.insert(position + offset, needle)
    return INSTRUCTION + "\n\n" + "\n\n".join(blocks), depths


def multikey(tokenizer, num_tokens: int, seed: int, keys: int = 4) -> TaskSample:
    """``keys`` needles with distinct words; the question asks for one (RULER niah_multikey)."""
    rng = random.Random(seed)
    words = distinct_words(rng, keys)
    numbers = [magic_number(rng) for _ in words]
    order = list(range(keys))
    rng.shuffle(order)
    context, depths = _place(tokenizer, num_tokens, rng, [NEEDLE.format(word=words[i], number=numbers[i]) for i in order])
    asked = rng.randrange(keys)
    question = "\n\n" + ONE_QUESTION.format(word=words[asked]) + "\n" + ONE_PREFIX.format(word=words[asked])
    return TaskSample("multikey", seed, context, question, numbers[asked] + ".", (numbers[asked],),
                      {"depths": depths, "asked": words[asked]})


def multivalue(tokenizer, num_tokens: int, seed: int, values: int = 4) -> TaskSample:
    """``values`` needles for one word; every number must be listed, in text order (RULER niah_multivalue)."""
    rng = random.Random(seed)
    (word,) = distinct_words(rng, 1)
    numbers = [magic_number(rng) for _ in range(values)]
    context, depths = _place(tokenizer, num_tokens, rng, [NEEDLE.format(word=word, number=n) for n in numbers])
    question = "\n\n" + MANY_QUESTION.format(word=word) + "\n" + MANY_PREFIX.format(word=word)
    return TaskSample("multivalue", seed, context, question, ", ".join(numbers) + ".", tuple(numbers),
                      {"depths": depths, "asked": word})


def multiquery(tokenizer, num_tokens: int, seed: int, keys: int = 4) -> TaskSample:
    """``keys`` needles with distinct words; the question asks for two of them (RULER niah_multiquery)."""
    rng = random.Random(seed)
    words = distinct_words(rng, keys)
    numbers = [magic_number(rng) for _ in words]
    context, depths = _place(tokenizer, num_tokens, rng, [NEEDLE.format(word=w, number=n) for w, n in zip(words, numbers)])
    a, b = rng.sample(range(keys), 2)
    question = "\n\n" + TWO_QUESTION.format(a=words[a], b=words[b]) + "\n" + TWO_PREFIX.format(a=words[a])
    answer = f"{numbers[a]}, and the special magic number for {words[b]} is {numbers[b]}."
    return TaskSample("multiquery", seed, context, question, answer, (numbers[a], numbers[b]),
                      {"depths": depths, "asked": [words[a], words[b]]})
