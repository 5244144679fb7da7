"""The CPU backend's decode step from Python: :func:`layer_step` runs a layer's plan
(:func:`~dashkv.ops.cpu.plan.plan_layer`), :func:`decode_step` plans and runs at once, and
:func:`dash_attention` is the fused step from given query codes (the benchmarks' entry).

Signature twins of :mod:`dashkv.ops.reference` (the ``Backend`` contract of :mod:`dashkv.ops.dispatch`):
their docstrings and argument checks repeat on purpose.
"""

from __future__ import annotations

import numpy as np
import torch

from dashkv.config import SHARING, check_choice
from dashkv.ops.cpu import api
from dashkv.ops.cpu import views as vw
from dashkv.ops.cpu.encode import NO_ENCODER, encode_query, few_rows
from dashkv.ops.cpu.plan import NO_KEY_ENCODER, NO_MASK, NO_MID, NO_ROWS, Prepared, plan_layer
from dashkv.ops.cpu.scratch import step_scratch
from dashkv.ops.cpu.step import Budget, Calibration, Prior, step_kernel
from dashkv.ops.reference import (
    LayerPlan,
    MidTierInputs,
    MidTierWeights,
    StepInputs,
    StepOutputs,
    StepSettings,
    expand_kv,
)


def _run_step(q, qc, shape, encoder, keyenc, coded, kv, masks, budget, calib, mid, prior, scaling,
              want_weights) -> StepOutputs:  # fmt: skip
    """:func:`~dashkv.ops.cpu.step.step_kernel` with its scratch, and its results as tensors."""
    nbatch, heads, tokens = shape
    seq = kv.length
    group = calib.group
    sel_heads = kv.kv_heads if group else heads
    nrows = nbatch * heads * tokens
    dist, off, kept_keys, kept_weights = step_scratch(nbatch * sel_heads * tokens, nbatch * tokens, seq, calib.top,
                                                      nrows if want_weights or prior.want else 0)  # fmt: skip
    out = np.empty((nrows, q.shape[1]), np.float32)
    counts, prior_np, probs, tiers = step_kernel(
        q, qc, shape, encoder, keyenc, coded, kv, masks, budget, calib, mid, prior, scaling, want_weights,
        want_weights, dist, off, kept_keys, kept_weights, out, api.CHUNK,
    )  # fmt: skip
    output = torch.from_numpy(out).view(nbatch, heads, tokens, -1)
    prior_t = torch.from_numpy(prior_np).view(nbatch, tokens, seq) if prior.want else None
    probs_t = tiers_t = None
    if want_weights:
        probs_t = torch.from_numpy(probs).view(nbatch, heads, tokens, seq)
        tiers_t = torch.from_numpy(tiers).view(nbatch, sel_heads, tokens, seq)
        tiers_t = expand_kv(tiers_t, heads) if group else tiers_t
    return StepOutputs(output, torch.from_numpy(counts), prior_t, probs_t, tiers_t)


def _empty_step(query: torch.Tensor, seq_shape: tuple[int, int, int, int], want_prior: bool, want_weights: bool):
    """A step over no keys, as the reference's: zero output, empty weights and tiers."""
    nbatch, _, tokens, _ = seq_shape
    empty = torch.zeros(seq_shape)
    return StepOutputs(
        torch.zeros_like(query), torch.zeros(3, dtype=torch.int64),
        torch.zeros(nbatch, tokens, 0) if want_prior else None,
        empty if want_weights else None, empty.to(torch.int8) if want_weights else None,
    )  # fmt: skip


_NO_CODES = np.zeros((0, 0, 0, 0), np.int64)
_NO_PRIOR = np.zeros((1, 1), np.float32)


def _f32_array(t: torch.Tensor) -> np.ndarray:
    """A float32 tensor as a numpy array without a copy where it can be (the decode path's case)."""
    if t.dtype != torch.float32 or t.requires_grad or not t.is_contiguous():
        t = t.detach().to(torch.float32).contiguous()
    return t.numpy()


def layer_step(plan: LayerPlan, inputs: StepInputs) -> StepOutputs:
    """One layer's whole DASH-KV step in one compiled call (see :func:`dashkv.ops.reference.layer_step`):
    the query codes (in the call where the plan's encoder allows it), distances, consensus, momentum,
    tiers, attention and the next layer's prior."""
    prep: Prepared = plan.prepared
    query, key = inputs.query, inputs.key
    if not (query.is_cpu and key.is_cpu and inputs.value.is_cpu):
        vw.check_cpu(query, key, inputs.value)
    nbatch, heads, tokens, dim = query.shape
    seq = key.shape[2]
    if seq == 0:
        return _empty_step(query, (nbatch, heads, tokens, 0), prep.want_prior, prep.want_weights)
    q = _f32_array(query).reshape(-1, dim)
    encoder, qc = NO_ENCODER, _NO_CODES
    if inputs.query_codes is not None:
        qc = vw.codes_array(inputs.query_codes)
    elif prep.encoder.on and few_rows(query):
        encoder = prep.encoder
    else:
        qc = vw.codes_array(encode_query(plan.encoder, query))
    if qc.size and qc.shape[:3] != (nbatch, heads, tokens) or inputs.key_codes.shape[:3] != key.shape[:3]:
        raise ValueError("codes do not match query / key shapes")
    coded = seq if inputs.coded is None else inputs.coded
    if coded < seq and plan.encoder is None:
        raise ValueError(f"keys from {coded} on have no codes and the plan has no encoder to code them")
    kv = vw.layer_rows(key, inputs.value, heads, inputs.key_codes, inputs.key_norms)
    group = prep.calib.group
    masks = vw.mask_rows(inputs.visible, inputs.always, (nbatch, kv.kv_heads if group else heads, tokens, seq),
                         heads, group)  # fmt: skip
    given = inputs.prior is not None
    prior = Prior(_f32_array(inputs.prior).reshape(nbatch * tokens, seq) if given else _NO_PRIOR, given, prep.decay,
                  prep.want_prior)  # fmt: skip
    out = _run_step(q, qc, (nbatch, heads, tokens), encoder, prep.keys, coded, kv, masks, prep.budget, prep.calib,
                    prep.mid, prior, prep.scaling, prep.want_weights)  # fmt: skip
    return out if query.dtype == torch.float32 else out._replace(output=out.output.to(query.dtype))


def decode_step(inputs: StepInputs, settings: StepSettings, mid: MidTierWeights | None) -> StepOutputs:
    """The whole DASH-KV step of one layer in one fused call (see :func:`dashkv.ops.reference.decode_step`)."""
    return layer_step(plan_layer(None, settings, mid), inputs)


def dash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_codes: torch.Tensor,
    key_codes: torch.Tensor,
    k_high: torch.Tensor | float,
    k_mid: torch.Tensor | float,
    scaling: float,
    visible: torch.Tensor | None = None,
    always: torch.Tensor | None = None,
    mid: MidTierInputs | None = None,
    return_probs: bool = False,
    return_tiers: bool = False,
    *,
    bits: int | None = None,
    min_votes: int = 0,
    spatial_step: int = 0,
    temporal: torch.Tensor | None = None,
    temporal_step: int = 0,
    share: str = "head",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Fused decode step: Hamming distances, calibration, tiers and tiered attention.

    Equals the reference chain of :func:`dashkv.ops.reference.decode_step` from the query codes on::

        raw = hamming_distance(qc, kc)                      # share="group": group_distance(raw, Hkv)
        spatial = select_smallest(raw, visible & ~always, k_high, 0, bits).sum(1) >= min_votes
        dist, lo = calibrate(raw, spatial, temporal, spatial_step, temporal_step)
        tiers = assign_tiers(dist, visible, always, k_high, k_mid, lo, bits)
        tiered_attention(q, K, V, tiers, scaling, mid with dist=raw)

    without materialising distances, tiers or probabilities as ``[B, H, T, S]`` tensors: one parallel
    pass computes the raw distances (one byte a key and query head) and their per-chunk histograms,
    an optional second one the votes, the per-key offsets and the calibrated histograms, a last one
    picks each chunk's high and mid keys and attends to them.

    Parameters
    ----------
    query : Tensor[B, H, T, D]
    key, value : Tensor[B, Hkv, S, D] (views with a head stride, as a growing cache's, are read in place)
    query_codes : Tensor[B, H, T, W], int64
    key_codes : Tensor[B, Hkv, S, W], int64
    k_high, k_mid : Tensor[B, H or 1, T] int64 -- keys for high and for mid outside ``always``; or two
        floats, fractions of each row's eligible keys as in ``DashKVConfig`` (``k_high =
        budget_counts(n, high)``, ``k_mid = budget_counts(n, high + mid) - k_high``)
    scaling : float
    visible, always : Tensor[B, 1 or H, T, S] bool, or None (all visible / none always)
    mid : MidTierInputs or None -- only ``bits``, the norms, ``temperature``, ``bias`` and
        ``residual`` are read (``dist`` and codes come from the fused pass and may be None)
    return_probs, return_tiers : also return the ``[B, H, T, S]`` probabilities / tiers (both or none)
    bits : int or None -- top of one head's distance range; default ``64 W``
    min_votes : int -- cross-head consensus: votes (of all ``H`` heads, or ``Hkv`` groups) a key needs
        for the spatial discount; 0 turns consensus off
    spatial_step, temporal_step : int, ``<= 0`` -- the discounts in whole bits of one head's distance
    temporal : Tensor[B, 1, T, S] bool or None -- the momentum mask
    share : ``"head"``, ``"group"`` (tiers per KV head, by each key's distance to the group's nearest head;
        masks must then be the same for every query head) or ``"union"`` (per-head tiers joined over the
        group)

    Returns
    -------
    output : Tensor[B, H, T, D], query's dtype
    probs : Tensor[B, H, T, S] float32 or None
    tiers : Tensor[B, H, T, S] int8 or None
    """
    if isinstance(k_high, float) != isinstance(k_mid, float):
        raise ValueError("k_high and k_mid must both be fractions (float) or both key counts (tensors)")
    check_choice("share", share, SHARING)
    if spatial_step > 0 or temporal_step > 0:
        raise ValueError(f"discounts must be <= 0, got spatial_step={spatial_step}, temporal_step={temporal_step}")
    vw.check_cpu(query, key, value, query_codes, key_codes)
    nbatch, heads, tokens, dim = query.shape
    kheads, seq = key.shape[1], key.shape[2]
    want = return_probs or return_tiers
    if seq == 0:
        out = _empty_step(query, (nbatch, heads, tokens, 0), False, want)
        return out.output, out.probs, out.tiers
    if tuple(query_codes.shape[:3]) != (nbatch, heads, tokens) or key_codes.shape[:3] != key.shape[:3]:
        raise ValueError("codes do not match query / key shapes")
    group = share == "group"
    words = query_codes.shape[-1]
    kv = vw.layer_rows(key, value, heads, key_codes, mid.key_norm if mid is not None else None)
    masks = vw.mask_rows(visible, always, (nbatch, kheads if group else heads, tokens, seq), heads, group)
    if isinstance(k_high, float):
        budget = Budget(True, k_high, k_mid, NO_ROWS, NO_ROWS)
    else:
        shape = (nbatch, heads, tokens)
        kh, km = vw.rows_of(k_high, shape), vw.rows_of(k_mid, shape)
        if group:  # per selection row: the counts of each group's first head
            kh = kh.reshape(nbatch, kheads, heads // kheads, tokens)[:, :, 0].reshape(-1)
            km = km.reshape(nbatch, kheads, heads // kheads, tokens)[:, :, 0].reshape(-1)
        budget = Budget(False, 0.0, 0.0, np.ascontiguousarray(kh), np.ascontiguousarray(km))
    tmask = NO_MASK
    if temporal is not None:
        tmask = vw.as_numpy(temporal.to(torch.bool).expand(nbatch, 1, tokens, seq)).reshape(-1, seq).view(np.uint8)
    calib = Calibration(64 * words if bits is None else int(bits), group, int(min_votes), int(spatial_step),
                        int(temporal_step), 0.0, tmask, temporal is not None, share == "union")  # fmt: skip
    tier = api.given_mid_tier(mid, (nbatch, heads, tokens), words) if mid is not None else NO_MID
    q = vw.as_numpy(query.detach().to(torch.float32)).reshape(-1, dim)
    out = _run_step(q, vw.codes_array(query_codes), (nbatch, heads, tokens), NO_ENCODER, NO_KEY_ENCODER, seq, kv,
                    masks, budget, calib, tier, Prior(_NO_PRIOR, False, 0.0, False), np.float32(scaling), want)  # fmt: skip
    output = out.output if query.dtype == torch.float32 else out.output.to(query.dtype)
    return output, out.probs if return_probs else None, out.tiers if return_tiers else None


__all__ = ["dash_attention", "decode_step", "layer_step", "plan_layer"]
