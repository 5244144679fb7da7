"""The evaluation protocol shared by every method: the context is prefilled (dense), then the question
and answer tokens go through the method, greedy decoding."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

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
