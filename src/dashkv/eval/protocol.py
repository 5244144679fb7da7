"""The evaluation protocol every method shares.

1. The context is prefilled once, densely, with the model's own attention (SDPA). The cache and, for kvpress baselines, the per-layer key
   scores of that prefill are kept (:class:`dashkv.prefilled.Prefill`).
2. Each method turns that prefill into the cache it decodes from (a copy, a hashed cache, a
   compressed or a quantized one) and runs the question and the answer tokens through itself as one
   block, teacher-forced, at the true positions after the context.
3. The answer is scored from the block's next-token predictions: a target (a number, a name) counts as
   reproduced when every one of its tokens is the argmax given the gold prefix and the token after it
   does not extend it with another digit. This is exactly whether greedy decoding would write that
   target after the gold text before it, at the cost of one forward instead of one per answer token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dashkv.eval.tasks.sample import TaskSample

logger = logging.getLogger(__name__)


@dataclass
class Block:
    """Question + answer tokens of a sample and where the targets sit among them.

    ``ids`` [1, T]; ``answer_start`` index of the first answer token in the block; ``targets`` a list of
    (first, last) token indices in the block, inclusive, one per target.
    """

    ids: torch.Tensor
    answer_start: int
    targets: list[tuple[int, int]]


def make_block(tokenizer, sample: TaskSample) -> Block:
    """Tokenize question and answer separately (as generation would see them) and locate the targets."""
    question = tokenizer(sample.question, add_special_tokens=False).input_ids
    enc = tokenizer(sample.answer, add_special_tokens=False, return_offsets_mapping=True)
    spans, cursor = [], 0
    for target in sample.targets:
        start = sample.answer.index(target, cursor)
        end = start + len(target)
        cursor = end
        tokens = [i for i, (a, b) in enumerate(enc.offset_mapping) if a < end and b > start]
        spans.append((len(question) + tokens[0], len(question) + tokens[-1]))
    ids = torch.tensor([question + enc.input_ids])
    return Block(ids, len(question), spans)


@torch.no_grad()
def block_logits(model, cache, ids: torch.Tensor, context_length: int, keep: int = 0) -> torch.Tensor:
    """Logits of a block ``ids`` [1, T] run over ``cache``: Tensor[T or keep, V] float32.

    Position ids continue the context (``context_length``) whatever the cache holds, as kvpress does
    after compression; ``keep`` > 0 keeps only the last ``keep`` rows (``logits_to_keep``).
    """
    positions = torch.arange(context_length, context_length + ids.shape[1]).view(1, -1)
    return model(input_ids=ids, past_key_values=cache, position_ids=positions, logits_to_keep=keep).logits[0]


def run_block(model, cache, block: Block, context_length: int) -> torch.Tensor:
    """Greedy predictions over the answer part of ``block``: Tensor[n_answer + 1] int64, where entry
    ``i`` is the argmax after block token ``answer_start + i - 1`` (so it predicts token
    ``answer_start + i``; the last entry predicts the token after the answer)."""
    keep = block.ids.shape[1] - block.answer_start + 1
    return block_logits(model, cache, block.ids, context_length, keep).argmax(-1)


def score_block(predicted: torch.Tensor, block: Block, tokenizer) -> tuple[float, list[bool]]:
    """Share of targets reproduced (see the module docstring) and the per-target verdicts."""
    gold = block.ids[0]
    verdicts = []
    for first, last in block.targets:
        rows = range(first - block.answer_start, last - block.answer_start + 1)
        ok = all(int(predicted[r]) == int(gold[block.answer_start + r]) for r in rows)
        after = tokenizer.decode([int(predicted[last - block.answer_start + 1])])
        target_text = tokenizer.decode(gold[first : last + 1].tolist())
        if ok and target_text[-1:].isdigit() and after[:1].isdigit():
            ok = False  # "12345" followed by another digit is a different number
        verdicts.append(ok)
    return sum(verdicts) / len(verdicts), verdicts
