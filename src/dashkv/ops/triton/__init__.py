"""GPU backend of the DASH-KV kernels: Triton, same signatures as :mod:`dashkv.ops.reference` (the spec;
integers equal exactly, floats within a dtype-keyed tolerance), for CUDA tensors.

The decode step (:func:`decode_step`) runs as a few launches with no ``[B, H, T, S]`` intermediate
unless the weights or the momentum prior are asked for:

1. code scan (:mod:`~dashkv.ops.triton.scan`): XOR + popcount of packed int64 words, one program per
   (batch, KV head, chunk of keys), writing the raw distances (int16) and per (row, chunk) histograms;
2. thresholds (:mod:`~dashkv.ops.triton.select`): the k-th smallest distance of each row from the
   summed histograms (a cumsum, no sort), the ties it still needs and each chunk's tie base;
3. calibration, when consensus or momentum is on: votes of every head's exact selection, the per-key
   offset, the calibrated histograms; then thresholds again;
4. split-K tiered attention (:mod:`~dashkv.ops.triton.attend`): tiers decided in place, exact logits
   from K rows of high keys, estimates from the codes for mid keys, V rows of high and mid keys only;
   a merge of the chunk partials with the anchor offset; the weights and prior if wanted.

Tiers per query head (``share="head"``) or per GQA group (``share="group"``, by the nearest head);
``share="union"`` joins the per-head tiers over each group and attends in a second pass.
fp16 / bf16 / fp32 inputs (fp32 accumulation); batches with padding; any number of query tokens.

Without a GPU, Triton's interpreter runs the same kernels on CPU tensors when ``TRITON_INTERPRET=1``
is set before this package is imported (the tests do so).
"""

from dashkv.ops.reference import HIDDEN, HIGH, LOW, MID, MidTierInputs, budget_counts, expand_kv
# the block prefill's score: torch ops, run on the GPU as written (a per-block distance, no kernel yet)
from dashkv.ops.reference import block_distance
# a dense layer's step: matmuls and a softmax, which torch runs well on the GPU (no kernel of ours)
from dashkv.ops.reference import dense_attention
from dashkv.ops.triton.api import (
    assign_tiers,
    decode_step,
    hamming_distance,
    layer_step,
    plan_layer,
    select_smallest,
    tiered_attention,
)
from dashkv.ops.triton.common import CHUNK
from dashkv.ops.triton.encode import encode_key, encode_query

DENSE_DECODE = False  # the dense step is torch ops here: SDPA (flash attention) is the faster one

__all__ = [
    "DENSE_DECODE",
    "CHUNK",
    "HIDDEN",
    "HIGH",
    "LOW",
    "MID",
    "MidTierInputs",
    "assign_tiers",
    "block_distance",
    "budget_counts",
    "decode_step",
    "dense_attention",
    "encode_key",
    "encode_query",
    "expand_kv",
    "hamming_distance",
    "layer_step",
    "plan_layer",
    "select_smallest",
    "tiered_attention",
]
