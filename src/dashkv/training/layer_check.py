"""Which layers trained encoders should leave to full attention, and how the layers share the high tier.

Each served layer goes through the tiers alone (every other one exact) over the tail of a long
document of the training split whose last tokens copy an earlier span, and its next-token KL against
full attention is measured. A copy needs each query to find one far key, the test that prose alone
does not set: on Gemma-3-270M one layer of three lost the copy (KL 0.84 at 16K against 0.014 and
0.002 for the others) while the mean recall of the held-out report looked like the others'
(docs/method.md). Layers above :data:`MAX_LAYER_KL` go into ``HashEncoders.dense_layers``.

Measured again with a smaller and a larger high share (:data:`BUDGET_STEP`), the same runs say which
layers gain from more keys and which lose nothing with fewer: :func:`allocate_budget` pairs them into
``HashEncoders.budget_scales`` with the mean share unchanged (the split is the training one, so that
the held-out text of ``dashkv eval`` and the benchmarks stays unseen by the choice).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch

import dashkv
from dashkv import corpus
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders
from dashkv.models import tiered_layers
from dashkv.prefill import chunked_prefill

COPY_TAIL = 256
MAX_LAYER_KL = 0.1
BUDGET_STEP = 0.6
"""A receiving layer's high share is ``1 + BUDGET_STEP`` times the config's, a giving layer's ``1 -
BUDGET_STEP`` times: one pair keeps the mean. (On Gemma-3-270M at 16K, layer 17 at 2 % high copies as
well as at 5 %, and layer 5 at 8 % loses a third less than at 5 %: docs/method.md.)"""
PREFILL_CHUNK = 2048


def copy_document(tokenizer, length: int, tail: int = COPY_TAIL, split: str = "train") -> torch.Tensor:
    """``[1, length]`` ids: prose of the corpus ``split`` (repeated if shorter), its last ``tail`` tokens
    replaced by a copy of the span that starts an eighth of the way in (the copy's source is ~7/8 of the
    context back)."""
    if length < 4 * tail:
        raise ValueError(f"length={length} is too short for a copied tail of {tail} tokens; use >= {4 * tail}")
    ids = tokenizer(corpus.text(split), return_tensors="pt").input_ids
    while ids.shape[1] < length - tail:
        ids = torch.cat([ids, ids], dim=1)
    prose = ids[:, : length - tail]
    start = (length - tail) // 8
    return torch.cat([prose, prose[:, start : start + tail]], dim=1)


def _tail_log_probs(model, cache, ids: torch.Tensor, tail: int) -> torch.Tensor:
    return model(ids[:, -tail:], past_key_values=cache).logits[0].float().log_softmax(-1)


@torch.no_grad()
def layer_check(model, encoders: HashEncoders, config: DashKVConfig, ids: torch.Tensor, tail: int = COPY_TAIL,
                progress=None, scales: tuple[float, ...] = ()) -> dict:  # fmt: skip
    """Each served layer alone through the tiers over the last ``tail`` tokens of ``ids`` [1, L].

    The first ``L - tail`` tokens are prefilled once, exactly (in chunks); full attention and every
    layer's run continue from copies of that cache. ``config`` is used as given, except that the
    encoders' own ``dense_layers`` and ``budget_scales`` are ignored (each layer is measured, at the
    config's ``high``) and every other served layer is exact; give it ``dense_below=0`` so the tiers
    run at any length.

    Returns ``{layer: {"kl", "perplexity", "kl_at"}}`` for each layer outside ``config.dense_layers``
    and ``"full": {"perplexity"}``: the mean next-token ``KL(P_full || P_layer)`` over the tail, the
    tail's perplexity, and ``kl_at[scale]``, the KL with ``high`` times each of ``scales``.
    """
    ids = ids.to(model.device)
    served = [i for i in tiered_layers(model) if i not in config.dense_layers]
    prefix, _ = chunked_prefill(model, ids[:, :-tail], PREFILL_CHUNK)
    targets = ids[0, -tail + 1 :].view(-1, 1)
    full = _tail_log_probs(model, copy.deepcopy(prefix), ids, tail)

    def perplexity(log_probs: torch.Tensor) -> float:
        return math.exp(float(-log_probs[:-1].gather(-1, targets).mean()))

    probe = copy.copy(encoders)  # the same weights, no layer left dense: every layer is measured
    probe.dense_layers = ()
    result: dict = {"full": {"perplexity": perplexity(full)}}
    for layer in progress(served) if progress else served:
        alone = replace(config, dense_layers=(*config.dense_layers, *(i for i in served if i != layer)))
        row: dict = {"kl_at": {}}
        for scale in (1.0, *scales):
            probe.budget_scales = {layer: scale}
            with dashkv.enable(model, probe, alone):
                hashed = _tail_log_probs(model, copy.deepcopy(prefix), ids, tail)
            kl = float((full.exp() * (full - hashed)).sum(-1).mean())
            if scale == 1.0:
                row.update(kl=kl, perplexity=perplexity(hashed))
            else:
                row["kl_at"][scale] = kl
        result[layer] = row
    return result


def layers_to_leave_dense(check: dict, max_kl: float = MAX_LAYER_KL) -> tuple[int, ...]:
    """The layers of a :func:`layer_check` result whose KL exceeds ``max_kl``."""
    return tuple(layer for layer, row in check.items() if layer != "full" and row["kl"] > max_kl)


def allocate_budget(check: dict, dense: tuple[int, ...] = (), step: float = BUDGET_STEP) -> dict[int, float]:
    """``HashEncoders.budget_scales`` from a :func:`layer_check` run with ``scales=(1 - step, 1 + step)``.

    Pairs a receiver (``1 + step``: the largest KL gain from more keys) with a giver (``1 - step``: the
    smallest KL loss from fewer) while the gain exceeds the loss, so the summed KL of the layers goes
    down and their mean high share stays the config's. Layers in ``dense`` take no part.
    """
    rows = {layer: row for layer, row in check.items() if layer != "full" and layer not in dense}
    gain = {layer: row["kl"] - row["kl_at"][1 + step] for layer, row in rows.items()}
    loss = {layer: row["kl_at"][1 - step] - row["kl"] for layer, row in rows.items()}
    receivers = sorted(rows, key=lambda layer: -gain[layer])
    givers = sorted(rows, key=lambda layer: loss[layer])
    scales: dict[int, float] = {}
    for receiver in receivers:
        if receiver in scales:
            continue
        giver = next((g for g in givers if g != receiver and g not in scales), None)
        if giver is None or gain[receiver] <= loss[giver]:
            break
        scales[receiver], scales[giver] = 1 + step, 1 - step
    return dict(sorted(scales.items()))
