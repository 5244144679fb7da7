"""RULER variable tracking in real text: a chain of assignments ``VAR A = 12345``, ``VAR B = VAR A``, ...
scattered as paragraphs; the question asks for every variable that holds the value.

On SmolLM2-135M full attention at 2K reproduces 0.10 of the names and no complete chain (6 samples;
0 at 500 tokens in the issue's harness), so the task is built and screened but not kept in the suites.
"""

from __future__ import annotations

import random
import string

from dashkv.eval.tasks.passkey import haystack
from dashkv.eval.tasks.sample import TaskSample, magic_number

INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
QUESTION = "Find all variables that are assigned the value {value} in the text above."
PREFIX = "According to the chain of variable assignment in the text above, {n} variables are assigned the value {value}, they are: "


def _names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def variable_tracking(tokenizer, num_tokens: int, seed: int, hops: int = 4) -> TaskSample:
    """One chain of ``hops + 1`` variables holding a 5-digit value."""
    rng = random.Random(seed)
    value = magic_number(rng, 5)
    names = _names(rng, hops + 1)
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i]} = VAR {names[i - 1]}" for i in range(1, hops + 1)]
    blocks = haystack(tokenizer, num_tokens - 40 - 12 * len(lines), rng)
    depths = sorted(rng.uniform(0.05, 0.95) for _ in lines)
    for offset, (depth, line) in enumerate(zip(depths, lines)):
        blocks.insert(round(depth * (len(blocks) - offset)) + offset, line)
    context = INSTRUCTION + "\n\n" + "\n\n".join(blocks)
    question = "\n\n" + QUESTION.format(value=value) + "\n" + PREFIX.format(n=len(names), value=value)
    return TaskSample("variable_tracking", seed, context, question, " ".join(names) + ".", tuple(names),
                      {"depths": depths})
