"""Pass-key retrieval in real text (RULER's single needle).

The format is fixed once, chosen so that full attention on SmolLM2-135M succeeds at 1K-4K tokens:
the needle on its own line between blank lines, the question after the text, and an answer prefix
that ends in a space. Looser formats make even full attention fail at 1K, and then no method can be
compared.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from dashkv.corpus import paragraphs

INSTRUCTION = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is "


@dataclass
class RetrievalSample:
    """One retrieval prompt: ``context`` is prefilled, ``question`` goes through the method.

    ``answer`` is the expected string; ``depth`` where the needle sits (0 = start, 1 = end).
    """

    context: str
    question: str
    answer: str
    depth: float


def haystack(tokenizer, num_tokens: int, rng: random.Random, split: str = "eval") -> list[str]:
    """Consecutive real-text paragraphs, from a random start, adding up to about ``num_tokens`` tokens."""
    pool = paragraphs(split)
    start = rng.randrange(len(pool))
    chosen, total = [], 0
    for i in range(len(pool)):
        paragraph = pool[(start + i) % len(pool)]
        total += len(tokenizer(paragraph, add_special_tokens=False).input_ids) + 2
        if total > num_tokens:
            break
        chosen.append(paragraph)
    return chosen


def insert_at_depth(blocks: list[str], needle: str, depth: float) -> str:
    """Join paragraphs with blank lines, the needle as its own paragraph at relative ``depth``."""
    position = round(depth * len(blocks))
    return "\n\n".join(blocks[:position] + [needle] + blocks[position:])


def make_sample(tokenizer, num_tokens: int, seed: int, depth: float | None = None) -> RetrievalSample:
    """A pass-key prompt of about ``num_tokens`` tokens; deterministic in ``seed``."""
    rng = random.Random(seed)
    key = str(rng.randrange(10_000, 100_000))
    depth = rng.uniform(0.1, 0.9) if depth is None else depth
    blocks = haystack(tokenizer, num_tokens - 60, rng)
    context = INSTRUCTION + "\n\n" + insert_at_depth(blocks, NEEDLE.format(key=key), depth)
    return RetrievalSample(context, f"\n\n{QUESTION}\n{ANSWER_PREFIX}", key, depth)


def score(prediction: str, answer: str) -> float:
    """1.0 when the first number in the prediction is the pass key."""
    found = re.findall(r"\d+", prediction)
    return float(bool(found) and found[0] == answer)


def task_sample(tokenizer, num_tokens: int, seed: int) -> "TaskSample":
    """The pass-key prompt as a :class:`~dashkv.eval.tasks.sample.TaskSample` (for the suite)."""
    from dashkv.eval.tasks.sample import TaskSample

    s = make_sample(tokenizer, num_tokens, seed)
    return TaskSample("passkey", seed, s.context, s.question, s.answer + ".", (s.answer,), {"depth": s.depth})
