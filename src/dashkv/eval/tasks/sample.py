"""The prompt of one task sample, and the words and numbers the needle tasks draw from."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Concrete nouns, one or two tokens each; keys of the needle tasks are drawn from this fixed list so a
# sample depends only on its seed.
WORDS = (
    "apple", "river", "candle", "garden", "hammer", "violin", "pencil", "mirror", "window", "rocket",
    "turtle", "blanket", "island", "castle", "tiger", "harbor", "lantern", "meadow", "basket", "pepper",
    "saddle", "falcon", "anchor", "bottle", "cactus", "dragon", "feather", "glacier", "helmet", "jacket",
    "kettle", "ladder", "magnet", "napkin", "orange", "parrot", "quilt", "rabbit", "salmon", "teapot",
    "umbrella", "valley", "walnut", "yogurt", "zebra", "bridge", "carpet", "donkey", "engine", "forest",
    "guitar", "hunter", "iceberg", "jungle", "koala", "lemon", "monkey", "needle", "oyster", "pillow",
    "rainbow", "spider", "tomato", "velvet", "wizard", "button", "cherry", "dolphin", "eagle", "fossil",
)


@dataclass(frozen=True)
class TaskSample:
    """One prompt of a task, in the form every method sees the same way.

    Attributes
    ----------
    task : str -- task name
    seed : int -- the sample is a pure function of ``(task, length, seed)``
    context : str -- prefilled (dense, shared by every method)
    question : str -- goes through the method; ends with the answer prefix
    answer : str -- the expected continuation (teacher-forced through the method when scoring)
    targets : tuple of str -- the parts of ``answer`` that must be reproduced (each scores equally)
    meta : dict -- e.g. needle depths, for the record
    """

    task: str
    seed: int
    context: str
    question: str
    answer: str
    targets: tuple[str, ...]
    meta: dict = field(default_factory=dict, compare=False)


def magic_number(rng: random.Random, digits: int = 7) -> str:
    """A random number of ``digits`` digits (no leading zero), as RULER's needles use."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def distinct_words(rng: random.Random, count: int) -> list[str]:
    if count > len(WORDS):
        raise ValueError(f"count={count} exceeds the {len(WORDS)} words available")
    return rng.sample(WORDS, count)
