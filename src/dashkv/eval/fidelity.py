"""Fidelity on real long text: next-token KL and perplexity of each method against full attention, and
the attention-mass recall of the key selectors.

A document is ``length`` consecutive tokens of held-out prose (``dashkv.corpus``, split ``"eval"``).
Its first ``length - tail`` tokens are prefilled densely; the last ``tail`` run through the method as
one block (the protocol of :mod:`dashkv.eval.protocol`). Per method: ``KL(P_full || P_method)`` of the
next-token distributions averaged over the block, and the perplexity of the block's tokens.
Attention-mass recall (:func:`dashkv.training.quality.recall_at`) is measured for the selectors
(oracle top-k, the DASH-KV encoders, random projection) on the block's queries: the share of full
attention's mass, over keys outside sinks and window, that falls on the keys a selector picks at the
budget (shared in a GQA group as the method's ``share`` says).
"""

from __future__ import annotations

import math
import time

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from dashkv import corpus
from dashkv.baselines.hashing import TieredMethod
from dashkv.baselines.method import Method
from dashkv.eval.protocol import block_logits
from dashkv.eval.store import ResultStore
from dashkv.eval.suite import SuiteSpec, measurable, prefill_for
from dashkv.models import attention_scaling, tiered_layers
from dashkv.registry import register_attention
from dashkv.training.collect import token_windows
from dashkv.training.quality import recall_at

RECORD_NAME = "dashkv_eval_record"
RECALL_QUERIES = 32  # the last block queries used for recall (the ranking is per query; 32 suffice)


class _QueryKeyRecorder:
    """Attention function that keeps each layer's block queries and all keys, then runs SDPA."""

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        self.layers[module.layer_idx] = (query[0, :, -RECALL_QUERIES:].float().clone(), key[0].float().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def documents(tokenizer, length: int, count: int) -> list[torch.Tensor]:
    """``count`` consecutive windows of ``length`` held-out tokens: Tensor[1, length] each. Beyond the
    held-out text (~11K tokens on the default model's tokenizer) it repeats, so the later part of a
    long document copies its earlier part (perplexity near 1: retrieval at every position)."""
    text = corpus.text("eval")
    while True:
        try:
            windows = token_windows(tokenizer, text, length, count)
            if len(windows) >= count:
                return [w.view(1, -1) for w in windows]
        except ValueError:  # shorter than one window
            pass
        text = text + "\n\n" + corpus.text("eval")


def _full_logits(model, pre, block: torch.Tensor, recorder: _QueryKeyRecorder) -> torch.Tensor:
    cache = Method().build_cache(model, pre)
    register_attention(RECORD_NAME, recorder, sdpa_mask)
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation(RECORD_NAME)
        return block_logits(model, cache, block, pre.length).float()
    finally:
        model.set_attn_implementation(previous)


def _recall(method: TieredMethod, recorder: _QueryKeyRecorder, length: int, scaling: float, served: list[int]) -> float:
    """Mean attention-mass recall of the high tier over the layers the method runs tiered (``served``: the
    model's full-attention layers, less the config's and the encoders' dense layers)."""
    cfg = method.config
    encoders = None if cfg.selector == "oracle" else method.encoders
    dense = set(cfg.dense_layers) | set(method.encoders.dense_layers if method.encoders is not None else ())
    positions = torch.arange(length - RECALL_QUERIES, length)
    share = cfg.share or (encoders.share if encoders is not None else "head")
    values = [
        recall_at(None if encoders is None else encoders.layers[i], q, k, positions, cfg.high, cfg.sinks, cfg.window,
                  scaling, share)  # fmt: skip
        for i, (q, k) in sorted(recorder.layers.items()) if i in served and i not in dense
    ]
    return sum(values) / len(values)


@torch.no_grad()
def run_fidelity(model, tokenizer, spec: SuiteSpec, methods: list[Method], store: ResultStore, progress=None) -> None:
    """Every (length, document, method) of ``spec`` not yet in ``store``."""
    scaling, served = attention_scaling(model), tiered_layers(model)
    jobs = [(length, doc) for length in spec.fidelity_lengths for doc in range(spec.fidelity_docs)]
    for length, doc in progress(jobs) if progress else jobs:
        todo = [m for m in measurable(methods, length - spec.fidelity_tail)
                if not store.has("fidelity", length, doc, m.name, m.budget)]  # fmt: skip
        if not todo:
            continue
        ids = documents(tokenizer, length, spec.fidelity_docs)[doc]
        context, block = ids[:, : -spec.fidelity_tail], ids[:, -spec.fidelity_tail :]
        pre = prefill_for(model, context, todo)
        recorder = _QueryKeyRecorder()
        full = _full_logits(model, pre, block, recorder).log_softmax(-1)
        targets = block[0, 1:]
        for method in todo:
            start = time.perf_counter()
            if method.name == "full":
                logp = full
            else:
                cache = method.build_cache(model, pre)
                with method.context(model):
                    logp = block_logits(model, cache, block, pre.length).float().log_softmax(-1)
                del cache
            nll = float(-logp[:-1].gather(-1, targets.view(-1, 1)).mean())
            kl = float((full.exp() * (full - logp)).sum(-1).mean())
            record = {"task": "fidelity", "length": length, "sample": doc, "method": method.name,
                      "budget": method.budget, "kl": kl, "nll": nll, "ppl": math.exp(nll),
                      "context_tokens": pre.length, "tail": spec.fidelity_tail,
                      "seconds": time.perf_counter() - start, **method.describe(pre)}
            if isinstance(method, TieredMethod) and method.budget is not None and not method.name.startswith("abl:"):
                record["recall"] = _recall(method, recorder, length, scaling, served)
            store.add(record)
