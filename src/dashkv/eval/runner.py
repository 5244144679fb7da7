"""The evaluation protocol shared by every method: the context is prefilled (dense), then the question
and answer tokens go through the method, greedy decoding. :func:`prefill_context`,
:func:`dynamic_copy` and :func:`answer_from_cache` share one prefill between methods and time the
decode steps (the demo)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

import dashkv
from dashkv.cache import DashKVCache
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders
from dashkv.stats import TierStats


@dataclass
class Answer:
    """A generated answer, the seconds it took (prefill + question + decode) and, for DASH-KV, tier stats."""

    text: str
    seconds: float
    context_tokens: int
    stats: TierStats | None = None


@torch.no_grad()
def generate_answer(
    model,
    tokenizer,
    context: str,
    question: str,
    max_new_tokens: int = 16,
    encoders: HashEncoders | None = None,
    config: DashKVConfig | None = None,
) -> Answer:
    """Prefill ``context``, then answer ``question``: full attention when ``config`` is None, else DASH-KV.

    The question is tokenized separately and appended, so the prefilled context is exactly the same
    tokens for every method.
    """
    ctx = tokenizer(context, return_tensors="pt").input_ids
    q = tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([ctx, q], dim=1).to(model.device)
    start = time.perf_counter()
    stats = None
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    if config is None:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    else:
        cache = DashKVCache(encoders, config.dense_layers)
        with dashkv.enable(model, encoders, config) as stats:
            model(ids[:, : ctx.shape[1]], past_key_values=cache)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, **kwargs)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return Answer(text, time.perf_counter() - start, ctx.shape[1], stats)


@dataclass
class DecodedAnswer:
    """A greedy answer decoded from a prefilled cache, with its timings.

    ``tokens``: the ``max_new_tokens`` generated ids (``text`` stops at the first end-of-sequence);
    ``question_s``: seconds of the question block's forward (it yields the first token);
    ``step_s``: seconds of each following one-token decode step.
    """

    text: str
    tokens: list[int]
    question_s: float
    step_s: list[float]

    @property
    def ms_per_token(self) -> float:
        """Median decode step in milliseconds (NaN without steps)."""
        return 1e3 * statistics.median(self.step_s) if self.step_s else float("nan")


@torch.no_grad()
def prefill_context(
    model, ids: torch.Tensor, encoders: HashEncoders, config: DashKVConfig
) -> tuple[DashKVCache, float]:
    """Prefill ``ids`` [1, L] once into a cache both full attention and DASH-KV can answer from.

    The forward runs under :func:`dashkv.enable` into a :class:`~dashkv.cache.DashKVCache` (its key codes
    are computed at DASH-KV's first read); with the default ``config.prefill == "dense"`` the
    attention of that forward is exact SDPA, so the K/V are those of a plain prefill
    (:func:`dynamic_copy` gives full attention its own copy). Returns the cache and the seconds the
    prefill took.
    """
    cache = DashKVCache(encoders, config.dense_layers)
    start = time.perf_counter()
    with dashkv.enable(model, encoders, config):
        model(ids.to(model.device), past_key_values=cache, logits_to_keep=1)
    return cache, time.perf_counter() - start


def dynamic_copy(cache) -> DynamicCache:
    """A stock transformers ``DynamicCache`` holding copies of ``cache``'s K and V (no codes): what full
    attention decodes from when a user runs it."""
    copy = DynamicCache()
    for i, layer in enumerate(cache.layers):
        copy.update(layer.keys.clone(), layer.values.clone(), i)
    return copy


@torch.no_grad()
def answer_from_cache(model, tokenizer, cache, question: str, max_new_tokens: int = 16) -> DecodedAnswer:
    """Run ``question`` as one block over a prefilled ``cache``, then greedy-decode one token at a time,
    timing each step: what ``generate`` does after a prefill, with timings (it stops at end-of-sequence;
    this decodes ``max_new_tokens`` tokens so that methods are timed over equal steps).

    Runs whatever attention the model has: call it inside :func:`dashkv.enable` for DASH-KV.
    """
    q = tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    start = time.perf_counter()
    out = model(q, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    question_s = time.perf_counter() - start
    tokens, steps = [int(token)], []
    for _ in range(max_new_tokens - 1):
        start = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        steps.append(time.perf_counter() - start)
        tokens.append(int(token))
    eos = tokenizer.eos_token_id
    shown = tokens[: tokens.index(eos)] if eos in tokens else tokens
    return DecodedAnswer(tokenizer.decode(shown, skip_special_tokens=True), tokens, question_s, steps)
