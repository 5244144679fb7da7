"""Eviction baselines through kvpress: SnapKV (``SnapKVPress``), H2O (``ObservedAttentionPress``) and
StreamingLLM (``StreamingLLMPress``), each keeping the budget's total number of context keys.

H2O's observed attention is summed from the SDPA prefill's queries and keys in chunks
(:func:`attention_column_sums`), which is what ``ObservedAttentionPress`` reads of eager attention's
weights; a test checks it against kvpress on an eager prefill.

kvpress compresses a layer's cache right after that layer's attention has run on the full prefill, so
the hidden states (and the scores of every later layer) do not depend on the compression ratio. One
prefill can therefore serve every budget: :class:`ScoreRecorder` is a kvpress press whose hook asks
each scorer press for its scores and keeps them instead of compressing; :func:`compress` then keeps the
top ``n`` keys per KV head exactly as ``ScorerPress.compress`` does. A test checks the result against
kvpress compressing during the prefill itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from kvpress import BasePress, ObservedAttentionPress, ScorerPress, SnapKVPress, StreamingLLMPress
from kvpress.utils import get_prerope_query_states
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from dashkv.baselines.budget import Budget
from dashkv.baselines.method import EvictedLayer, LayersCache, Method, copy_layers, gather_keys
from dashkv.models import sliding_windows
from dashkv.prefilled import Prefill

# press name -> (kvpress scorer, needs the prefill's attention weights)
SCORERS: dict[str, tuple[type[ScorerPress], bool]] = {
    "snapkv": (SnapKVPress, False),
    "h2o": (ObservedAttentionPress, True),
}
QUERY_CHUNK = 512


def attention_column_sums(module, hidden_states: torch.Tensor, keys: torch.Tensor, position_embeddings) -> torch.Tensor:
    """The prefill's causal attention weights summed over queries: Tensor[B, H, 1, L].

    ``ObservedAttentionPress.score`` reads its attention argument only through ``.sum(2)``, so these
    sums stand in for the ``[B, H, L, L]`` weights eager attention would return, computed in query
    chunks from the SDPA prefill (the same queries, post-RoPE, and keys) -- no eager prefill, and no
    ``L x L`` matrix per layer (gigabytes at 8K).
    """
    query = get_prerope_query_states(module, hidden_states)
    cos, sin = position_embeddings
    query, _ = apply_rotary_pos_emb(query, query, cos, sin)
    groups = query.shape[1] // keys.shape[1]
    k = repeat_kv(keys, groups)
    length = k.shape[2]
    sums = torch.zeros(query.shape[0], query.shape[1], 1, length, dtype=torch.float32, device=keys.device)
    for start in range(0, query.shape[2], QUERY_CHUNK):
        q = query[:, :, start : start + QUERY_CHUNK]
        logits = (q @ k.transpose(-1, -2)).float() * module.scaling
        rows = torch.arange(start, start + q.shape[2], device=q.device).view(-1, 1)
        logits.masked_fill_(torch.arange(length, device=q.device).view(1, -1) > rows, float("-inf"))
        sums += logits.softmax(-1).sum(2, keepdim=True)
    return sums


@dataclass
class ScoreRecorder(BasePress):
    """A kvpress press that records each scorer's per-layer key scores and compresses nothing.

    ``sink`` maps a scorer name to a list, indexed by layer, of Tensor[B, Hkv, L] scores.
    """

    scorers: dict[str, ScorerPress] = field(default_factory=dict)
    sink: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        for name, scorer in self.scorers.items():
            per_layer = self.sink.setdefault(name, [])
            while len(per_layer) <= module.layer_idx:
                per_layer.append(None)
            weights = attentions
            if weights is None and SCORERS[name][1]:
                weights = attention_column_sums(module, hidden_states, keys, kwargs["position_embeddings"])
            per_layer[module.layer_idx] = scorer.score(module, hidden_states, keys, values, weights, kwargs).detach()
        return keys, values


def recorder_for(model, names: tuple[str, ...]):
    """A callable ``sink -> context manager`` that records the scores of ``names`` during a prefill
    (for :func:`dashkv.prefilled.prefill`)."""
    def enter(sink: dict):
        return ScoreRecorder({n: SCORERS[n][0]() for n in names}, sink)(model)

    return enter


def compress(keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``kept`` highest-scoring keys of each KV head (``ScorerPress.compress``'s rule)."""
    if kept >= keys.shape[2]:
        return keys, values
    return gather_keys(keys, values, scores.topk(kept, dim=-1).indices)


def streaming_scores(keys: torch.Tensor, kept: int, sinks: int) -> torch.Tensor:
    """StreamingLLMPress's scores for a cache of ``keys`` [B, Hkv, L, D] compressed to ``kept`` keys."""
    length = keys.shape[2]
    ratio = 1.0 - (kept + 0.5) / length  # int(L * (1 - ratio)) == kept exactly
    return StreamingLLMPress(compression_ratio=ratio, n_sink=sinks).score(None, None, keys, None, None, {})


@dataclass
class PressMethod(Method):
    """A kvpress scorer applied to the context at the budget's total kept count; then the question and
    answer run with ordinary full attention over the compressed cache. Layers a model's config marks
    as sliding-window keep their keys (kvpress would press them like the others, leaving a 512-token
    window a few dozen keys: Gemma-3's perplexity rose 16-fold at 8K)."""

    sinks: int = 4
    window: int = 64

    def _budget(self) -> Budget:
        return Budget(self.budget, self.sinks, self.window)

    def build_cache(self, model, prefill: Prefill) -> Cache:
        kept = self._budget().kept(prefill.length)
        # sliding layers are left as DASH-KV leaves them: transformers' own window layer, their window their budget
        sliding = sliding_windows(model.config)
        layers = []
        for i, (keys, values) in enumerate(prefill.keys_values()):
            if i in sliding:
                layers.append(DynamicSlidingWindowLayer(sliding[i]))
                layers[-1].update(keys, values)
                continue
            if kept >= keys.shape[2]:  # nothing to evict
                scores = torch.zeros(keys.shape[:3], device=keys.device)
            elif self.name == "streamingllm":
                scores = streaming_scores(keys, kept, self.sinks)
            else:
                scores = prefill.scores[self.name][i]
            pressed = compress(keys, values, scores, kept)
            layers += copy_layers([pressed], EvictedLayer, evicted=keys.shape[2] - pressed[0].shape[2])
        return LayersCache(layers)

    def describe(self, prefill: Prefill) -> dict:
        kept = self._budget().kept(prefill.length)
        return {"kept": kept, "kept_share": kept / prefill.length}


def press_method(name: str, budget: Budget) -> PressMethod:
    """``"snapkv"``, ``"h2o"`` or ``"streamingllm"`` at ``budget``."""
    if name == "streamingllm":
        return PressMethod(name=name, budget=budget.share, sinks=budget.sinks, window=budget.window)
    if name not in SCORERS:
        raise ValueError(f"name={name!r} is not a kvpress baseline; choose one of {sorted(SCORERS) + ['streamingllm']}")
    return PressMethod(name=name, budget=budget.share, presses=(name,), sinks=budget.sinks, window=budget.window)
