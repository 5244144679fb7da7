"""Fast CPU backend of the DASH-KV kernels: numba, multi-threaded, same signatures as
:mod:`dashkv.ops.reference` (the spec; integers equal exactly, floats within rounding).

Why numba: every step of the decode kernel is a data-dependent scan over ``S`` keys (popcount,
histogram, tie-breaking rank, gather of the selected rows) that torch can only express densely
(``[B, H, T, S, W]`` XORs, ``flip + cumsum`` ranks, ``-inf``-masked dense ``q @ K^T``). Compiled
loops touch each key code once per pass and read K/V rows only for the keys that count. Numba is
already a dependency, compiles for the host CPU (``popcnt``/AVX-512 where present), caches to disk
(``cache=True``) and needs no compiler at install time.

Work split: the key axis is cut into chunks of :data:`CHUNK` keys and one task is a
``(batch, KV head, chunk)`` triple, run with ``prange``. A task loops over the ``H / Hkv`` query heads
and ``T`` query tokens that share its KV head, so the K/V rows a chunk needs are fetched from memory
once and reused from L2 by the whole GQA group. Chunking also balances 9 or 12 heads over 2 cores,
which a head-per-thread split cannot.

Modules, one concept each:

- :mod:`~dashkv.ops.cpu.jit`: intrinsics, 16-bit loads, ``exp``;
- :mod:`~dashkv.ops.cpu.select`: Hamming rows, histograms, exact sort-free selection and tiers;
- :mod:`~dashkv.ops.cpu.attend`: split-softmax attention over given tiers and its merge;
- :mod:`~dashkv.ops.cpu.dense`: full attention over every visible key, K and V read once per GQA group;
- :mod:`~dashkv.ops.cpu.encode`: codes of a few new queries or keys;
- :mod:`~dashkv.ops.cpu.tables`: the mid tier's lookup tables;
- :mod:`~dashkv.ops.cpu.fused`: the passes of the fused decode step (:func:`dash_attention`);
- :mod:`~dashkv.ops.cpu.step`: that step as one compiled call, and the named tuples it takes;
- :mod:`~dashkv.ops.cpu.views`: torch tensors as the kernels' arrays (key rows, mask rows), checks;
- :mod:`~dashkv.ops.cpu.scratch`: reusable buffers of the step;
- :mod:`~dashkv.ops.cpu.plan`: a layer's step prepared once (:func:`plan_layer`);
- :mod:`~dashkv.ops.cpu.api`: the per-op functions (the reference's signatures);
- :mod:`~dashkv.ops.cpu.layer`: the decode step from Python (:func:`layer_step`, :func:`dash_attention`).

The public functions of the last two are re-exported here.

Threads: numba's own pool (``numba.set_num_threads`` / ``NUMBA_NUM_THREADS``), independent of
``torch.set_num_threads``. With the ``omp`` layer and other busy processes on the same cores, a
parallel launch waits until every worker gets a time slice; ``OMP_WAIT_POLICY=passive`` or the
``tbb`` layer (``pip install tbb``) softens it. All kernels release the GIL.
"""

from dashkv.ops.cpu.api import (
    CHUNK,
    assign_tiers,
    block_distance,
    code_scan_plan,
    hamming_distance,
    kth_smallest,
    select_smallest,
    tiered_attention,
)
from dashkv.ops.cpu.dense import dense_attention
from dashkv.ops.cpu.encode import encode_key, encode_query
from dashkv.ops.cpu.layer import dash_attention, decode_step, layer_step, plan_layer
from dashkv.ops.reference import HIDDEN, HIGH, LOW, MID, MidTierInputs, budget_counts, expand_kv

DENSE_DECODE = True  # the dense kernel reads a GQA group's K and V once: faster than SDPA at decode

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
    "code_scan_plan",
    "dash_attention",
    "dense_attention",
    "decode_step",
    "encode_key",
    "encode_query",
    "expand_kv",
    "hamming_distance",
    "kth_smallest",
    "layer_step",
    "plan_layer",
    "select_smallest",
    "tiered_attention",
]
