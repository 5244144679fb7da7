"""Held-out quality report of trained encoders: per layer and averaged, at one context length.

- attention-mass recall of the high tier (and of high + mid) at given budgets, for the trained
  encoders, random-projection encoders of the same bits, and oracle top-k (exact ``q.k``), counting
  only keys outside the sinks and the local window;
- relative error of the tiered attention output against full attention (sampled queries);
- next-token KL of the whole model, DASH-KV against full attention, over a block of query tokens that
  goes through the tiers after a dense prefill.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

import dashkv
from dashkv.attention import tiered_step
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders
from dashkv.ops import reference as ops
from dashkv.training.collect import LayerSignals
from dashkv.training.quality import recalls_at, teacher_probs, visible_mask


@torch.no_grad()
def output_error(
    encoder, signals: LayerSignals, config: DashKVConfig, scaling: float, probs: list[torch.Tensor]
) -> float:
    """Mean ``|o_tiered - o_full| / |o_full|`` over sampled queries and heads (no momentum prior);
    ``probs`` the teacher's attention of each window (:func:`teacher_probs`)."""
    errors = []
    windows = zip(signals.keys, signals.values, signals.queries, signals.positions, probs)
    for keys, values, queries, positions, teacher in windows:
        k, v, q = keys.unsqueeze(0), values.unsqueeze(0), queries.unsqueeze(0)
        codes, norms = encoder.encode_key(k)
        visible = visible_mask(positions, keys.shape[1]).view(1, 1, -1, keys.shape[1])
        # the configured backend (fast on CPU; its tiers equal the reference's, tested): the reference
        # made the 8K report take over ten minutes
        tiered = tiered_step(q, k, v, codes, norms, encoder, config, visible, scaling, None).output
        full = teacher @ ops.expand_kv(v, q.shape[1])[0]
        errors.append(((tiered[0] - full).norm(dim=-1) / full.norm(dim=-1).clamp(min=1e-9)).mean())
    return float(torch.stack(errors).mean())


def layer_report(
    encoders: HashEncoders,
    random: HashEncoders,
    signals: dict[int, LayerSignals],
    config: DashKVConfig,
    fractions: tuple[float, ...] = (0.05, 0.10),
    scaling: float | None = None,
) -> dict:
    """Recall and output error per non-dense layer, and their mean over layers (key ``"mean"``).
    ``scaling``: the model's attention scaling (default ``head_dim ** -0.5``)."""
    scaling = scaling if scaling is not None else encoders.shape["head_dim"] ** -0.5
    rows: dict = {}
    for layer, sig in sorted(signals.items()):
        if layer in config.dense_layers:
            continue
        row = {}
        probs = [teacher_probs(q, k, p, scaling) for k, q, p in zip(sig.keys, sig.queries, sig.positions)]
        budgets = [f for frac in fractions for f in (frac, min(1.0, frac + config.mid))]  # high, high + mid
        for name, enc in (("oracle", None), ("trained", encoders.layers[layer]), ("random", random.layers[layer])):
            per_window = [
                recalls_at(enc, q, k, p, budgets, config.sinks, config.window, t)
                for k, q, p, t in zip(sig.keys, sig.queries, sig.positions, probs)
            ]
            means = [sum(column) / len(per_window) for column in zip(*per_window)]
            for i, frac in enumerate(fractions):
                tag = f"{round(frac * 100)}%"
                row[f"{name}_high@{tag}"], row[f"{name}_high+mid@{tag}"] = means[2 * i], means[2 * i + 1]
        if sig.values:
            row["output_error_trained"] = output_error(encoders.layers[layer], sig, config, scaling, probs)
            row["output_error_random"] = output_error(random.layers[layer], sig, config, scaling, probs)
        rows[layer] = row
    keys = next(iter(rows.values())).keys()
    rows["mean"] = {k: sum(r[k] for r in rows.values()) / len(rows) for k in keys}
    return rows


def gap_closed(mean_row: dict, tag: str = "5%") -> float:
    """Share of the random -> oracle recall gap the trained encoders close at the high tier."""
    oracle, trained, random = (mean_row[f"{n}_high@{tag}"] for n in ("oracle", "trained", "random"))
    return (trained - random) / max(oracle - random, 1e-9)


@torch.no_grad()
def next_token_kl(
    model, ids: torch.Tensor, encoder_sets: dict[str, HashEncoders], config: DashKVConfig, tail: int = 32
) -> dict[str, float]:
    """Mean ``KL(P_full || P_dashkv)`` of the next-token distributions over the last ``tail`` tokens of
    ``ids`` [1, L], for each named encoder set: the first ``L - tail`` tokens are prefilled densely, the
    tail goes through the tiers. The prefill runs once: each encoder set continues from a copy of its
    cache (DASH-KV encodes the copied keys), full attention from the cache itself, so the report costs
    one long forward, not three."""
    ids = ids.to(model.device)
    prefix = DynamicCache()
    model(ids[:, :-tail], past_key_values=prefix)
    hashed = {}
    for name, encoders in encoder_sets.items():
        with dashkv.enable(model, encoders, config):
            hashed[name] = model(ids[:, -tail:], past_key_values=copy.deepcopy(prefix)).logits[0].log_softmax(-1)
    full = model(ids[:, -tail:], past_key_values=prefix).logits[0].log_softmax(-1)  # last: it may extend prefix
    return {name: float((full.exp() * (full - h)).sum(-1).mean()) for name, h in hashed.items()}
