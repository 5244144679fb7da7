"""``dashkv eval``: the long-context suites (retrieval tasks, fidelity) over every method and budget.

One dense prefill per sample serves every method (see :mod:`dashkv.eval.protocol`); results go to a
:class:`~dashkv.eval.store.ResultStore` as they are measured.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from dashkv.baselines.method import Method
from dashkv.baselines.presses import recorder_for
from dashkv.eval.protocol import make_block, run_block, score_block
from dashkv.eval.store import ResultStore
from dashkv.eval.tasks import TASKS
from dashkv.models import GEMMA_MODEL
from dashkv.prefilled import prefill

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class SuiteSpec:
    """A suite: retrieval ``tasks`` as ``{name: ((context tokens, samples), ...)}`` and fidelity documents.

    Attributes
    ----------
    fidelity_lengths : context lengths of the fidelity documents
    fidelity_docs : documents per length
    fidelity_tail : tokens of each document run through the method (the rest is prefilled)
    fidelity_budgets : budgets measured for fidelity (None: every budget of the run)
    dropped : tasks built but not run, and why
    """

    name: str
    tasks: dict[str, tuple[tuple[int, int], ...]]
    fidelity_lengths: tuple[int, ...] = ()
    fidelity_docs: int = 1
    fidelity_tail: int = 128
    fidelity_budgets: tuple[float, ...] | None = None
    dropped: dict[str, str] = field(default_factory=dict)

    def cells(self) -> list[tuple[str, int, int]]:
        """``(task, context tokens, samples)`` of every retrieval cell."""
        return [(task, length, count) for task, cells in self.tasks.items() for length, count in cells]


DROPPED = {
    "variable_tracking": "full attention at 2K finds 0.10 of the names and no complete chain in 6 samples "
                         "(0 at 500 tokens in the issue's harness): the model does not follow the chain",
    "common_words": "full attention scores 0/4 at 2K: the model does not count word frequencies",
}

# Full attention on SmolLM2-135M at 2K (teacher-forced protocol, 6 samples each): multi-value 0.58 of
# the numbers, multi-query 0.50 -- kept, but only in the full suite: the quick suite must fit 45 min on
# 2 shared cores, and pass key (10) + multi-key (20, the noisy one) already cost most of it.
SUITES = {
    "quick": SuiteSpec("quick", {"passkey": ((2048, 10),), "multikey": ((2048, 20),)},
                       fidelity_lengths=(2048, 4096, 8192), fidelity_docs=1, fidelity_tail=64,
                       fidelity_budgets=(0.05,), dropped=DROPPED),
    "full": SuiteSpec("full", {"passkey": ((4096, 20),), "multikey": ((2048, 40),), "multivalue": ((2048, 20),),
                               "multiquery": ((2048, 20),)},
                      fidelity_lengths=(2048, 4096, 8192), fidelity_docs=3, fidelity_tail=256, dropped=DROPPED),
}

# Models whose positions reach further get suites at their lengths (``dashkv eval --model``). Gemma-3-270M
# (32K positions): retrieval up to 16K, fidelity up to 32K (prefilled in chunks above SINGLE_SHOT).
_LONG = ((2048, 20), (8192, 20), (16384, 20))
MODEL_SUITES = {
    GEMMA_MODEL: {
        "quick": SuiteSpec("quick", {"passkey": ((2048, 5), (8192, 5), (16384, 5)), "multikey": ((2048, 5), (8192, 5))},
                           fidelity_lengths=(8192, 16384, 32768), fidelity_docs=1, fidelity_tail=64,
                           fidelity_budgets=(0.05,)),
        "full": SuiteSpec("full", {"passkey": _LONG, "multikey": _LONG}, fidelity_lengths=(8192, 16384, 32768),
                          fidelity_docs=2, fidelity_tail=256),
    },
}

SINGLE_SHOT = 16384
"""Contexts up to this many tokens are prefilled in one forward (kvpress scores such a prefill);
longer ones in chunks of :data:`PREFILL_CHUNK` (a single-shot 32K prefill of Gemma-3-270M holds
``[heads, T, T]`` attention weights in its sliding layers: 16 GB), where methods that need kvpress
scores are not measured."""
PREFILL_CHUNK = 2048


def suite_for(name: str, model: str | None) -> SuiteSpec:
    """The suite ``name`` at the lengths of ``model`` (a short name of :func:`dashkv.load_model`; other
    models and None get the default model's suites)."""
    suites = MODEL_SUITES.get(model, SUITES) if model is not None else SUITES
    if name not in suites:
        raise ValueError(f"suite={name!r} is not known; choose one of {sorted(suites)}")
    return suites[name]


def measurable(methods: list[Method], length: int) -> list[Method]:
    """The methods that can be measured on a context of ``length`` tokens: beyond :data:`SINGLE_SHOT`
    the prefill is chunked and kvpress scorers (SnapKV, H2O) see only its first chunk."""
    if length <= SINGLE_SHOT:
        return methods
    skipped = sorted({m.name for m in methods if m.presses})
    if skipped:
        logger.info("%s: not measured at %d tokens (kvpress scores a single-shot prefill)", ", ".join(skipped), length)
    return [m for m in methods if not m.presses]


def prefill_for(model, ids: torch.Tensor, methods: list[Method]):
    """One dense prefill of ``ids`` [1, L] that serves every method of ``methods``: it records the
    key scores of each kvpress press among them."""
    presses = tuple(sorted({p for m in methods for p in m.presses}))
    chunk = PREFILL_CHUNK if ids.shape[1] > SINGLE_SHOT else None
    return prefill(model, ids, recorder=recorder_for(model, presses) if presses else None, chunk_size=chunk)


@torch.no_grad()
def run_retrieval(model, tokenizer, spec: SuiteSpec, methods: list[Method], store: ResultStore, progress=None) -> None:
    """Every (task, sample, method) of ``spec`` not yet in ``store``; ``progress`` wraps an iterable."""
    jobs = [(task, length, seed) for task, length, count in spec.cells() for seed in range(count)]
    for task, length, seed in progress(jobs) if progress else jobs:
        todo = [m for m in methods if not store.has(task, length, seed, m.name, m.budget)]
        if not todo:
            continue
        sample = TASKS[task](tokenizer, length, seed)
        ids = tokenizer(sample.context, return_tensors="pt").input_ids
        todo = measurable(todo, ids.shape[1])
        if not todo:
            continue
        start, cpu = time.perf_counter(), time.process_time()
        pre = prefill_for(model, ids, todo)
        prefill_seconds, prefill_cpu = time.perf_counter() - start, time.process_time() - cpu
        block = make_block(tokenizer, sample)
        for method in todo:
            start, cpu = time.perf_counter(), time.process_time()
            cache = method.build_cache(model, pre)
            with method.context(model):
                predicted = run_block(model, cache, block, pre.length)
            score, verdicts = score_block(predicted, block, tokenizer)
            store.add({
                "task": task, "length": length, "sample": seed, "method": method.name, "budget": method.budget,
                "score": score, "verdicts": verdicts, "context_tokens": pre.length,
                "prediction": tokenizer.decode(predicted[:-1].tolist()), "answer": sample.answer,
                "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                "prefill_seconds": prefill_seconds, "prefill_cpu_seconds": prefill_cpu,
                **method.describe(pre),
            })
            del cache
