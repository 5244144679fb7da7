"""End-to-end decode speed on a real model: stock full attention, the parts DASH-KV changes, and a
kvpress eviction baseline, in the same run.

For each context length (real prose from :mod:`dashkv.corpus`) every row prefills the context into
its own cache (above :data:`SINGLE_SHOT` tokens: each copies one shared chunked prefill), then the
rows decode ``new_tokens`` tokens greedily, one forward a token, taking turns in blocks of
:data:`BLOCK` tokens, and each decode step is timed. Interleaved, the rows see the same
machine load: on a shared machine the speed of a whole run drifts by tens of percent within minutes,
more than the differences measured. The rows:

- ``full``: stock full attention -- the model's SDPA over a transformers ``DynamicCache``, which
  concatenates the whole K and V at every step: what a user runs without DASH-KV;
- ``full_inplace``: the same attention over ``DashKVCache(None)``, the cache DASH-KV decodes from
  without key codes (preallocated, grows by doubling): what the cache alone buys;
- ``full_kernel``: exact attention on that cache through DASH-KV's dense kernel (``enable`` with
  ``dense_below`` above the context: every layer attends to every key, reading a GQA group's K and V
  rows once): the fastest exact rival, what the tiers must beat;
- ``dashkv_head``, ``dashkv_group`` and ``dashkv_union``: DASH-KV with the shipped encoders (else random
  ones) and the default config, tiers chosen per query head, per GQA group and per head joined over the
  group (``DashKVConfig.share``);
- ``snapkv``: kvpress' ``SnapKVPress`` compressing the context during the prefill (the observation
  window is the config's ``window``), then full attention over the kept keys. It keeps as many keys
  per KV head as DASH-KV attends to in its high and mid tiers together: ``Budget(high + mid, sinks,
  window).kept(L)`` -- sinks, window and ``ceil((high + mid) * eligible)`` keys, the budget
  definition every method shares (:mod:`dashkv.baselines.budget`). The mid tier reads V rows like
  the high tier, so high + mid, not high alone, is the share of the cache a decode step uses. Not
  run above :data:`SINGLE_SHOT` tokens (kvpress compresses inside a single-shot prefill), nor on
  models with sliding-window layers (kvpress presses every layer alike; Gemma-3 is not among its
  tested models).

Reported per row: decode ms per token (median; min-max), tokens/s, speed against ``full``
(``vs_full``, > 1 is faster), the share of decode time spent inside the attention function, prefill
seconds, the memory its cache holds, and how many leading tokens equal ``full``'s; per context
length, the peak resident memory (RSS) of the process.

Attention time is measured by running the model with a registered attention function that times the
one it would call (``"sdpa"``, or ``"dashkv"`` under :func:`dashkv.enable`) -- no ``forward`` is
patched. It covers the attention call only: the projections, RoPE and the cache update (where
DASH-KV codes each new key) are outside it.

Importing kvpress wraps every registered attention function once (a check for head-wise masking, a
few attribute reads a call); it happens before any row runs, so every row pays it alike.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dashkv.bench.harness import MAX_BUSY, AttentionTimer, Competitors, PeakRss, timed_attention

LENGTHS = (2048, 4096, 8192)
ROWS = {
    "full": "full attention (DynamicCache)",
    "full_inplace": "full attention (in-place cache)",
    "full_kernel": "full attention (dense kernel, in-place cache)",
    "dashkv_head": "DASH-KV share=head",
    "dashkv_group": "DASH-KV share=group",
    "dashkv_union": "DASH-KV share=union",
    "snapkv": "SnapKV (kvpress)",
}
BLOCK = 4  # tokens a row decodes before the next row's turn
SINGLE_SHOT = 8192
"""Contexts up to this many tokens: every row prefills its own cache in one forward. Longer ones: one
exact chunked prefill (:func:`dashkv.prefill.chunked_prefill`, :data:`PREFILL_CHUNK` tokens a chunk)
whose cache every row copies; a single-shot prefill of a 32K context on Gemma-3-270M holds
``[heads, T, T]`` float attention weights in its sliding layers (16 GB)."""
PREFILL_CHUNK = 2048


# --------------------------------------------------------------------------------------- decode


@dataclass
class DecodeRun:
    """One row at one context length.

    ``kept_tokens``: keys in the cache after the prefill (fewer than ``context_tokens`` for SnapKV);
    ``attention_share``: attention seconds / decode seconds over all steps; ``attention_ms_median``:
    the median step's attention time; ``cache_mb``: what the row's cache holds after the decode
    (buffers at their capacity, codes included).
    """

    context_tokens: int
    kept_tokens: int
    prefill_s: float
    step_ms_median: float
    step_ms_min: float
    step_ms_max: float
    tokens_per_s: float
    attention_ms_median: float
    attention_share: float
    cache_mb: float
    tokens: list[int]


def context_ids(tokenizer, length: int) -> torch.Tensor:
    """``[1, length]`` token ids of real prose (the corpus, repeated if it is shorter)."""
    from dashkv import corpus

    ids = tokenizer(corpus.text("eval"), return_tensors="pt").input_ids
    while ids.shape[1] < length:
        ids = torch.cat([ids, ids], dim=1)
    return ids[:, :length]


def cache_bytes(cache) -> int:
    """Bytes of the tensors a transformers cache holds (a DASH-KV layer's buffers at their capacity)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        buffers = getattr(layer, "_buffers", None)
        tensors = buffers.values() if buffers else (getattr(layer, "keys", None), getattr(layer, "values", None))
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


@dataclass
class Row:
    """A row being measured: its cache, the context it decodes in (``session``: e.g. ``dashkv.enable``)
    and what it recorded so far."""

    cache: object
    session: Callable[[], AbstractContextManager]
    prefill_s: float = 0.0
    kept: int = 0
    tokens: list[int] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    attention: list[float] = field(default_factory=list)

    def result(self, length: int) -> DecodeRun:
        median = statistics.median(self.steps)
        return DecodeRun(length, self.kept, self.prefill_s, median * 1e3, min(self.steps) * 1e3,
                         max(self.steps) * 1e3, 1.0 / median, statistics.median(self.attention) * 1e3,
                         sum(self.attention) / sum(self.steps), cache_bytes(self.cache) / 2**20, self.tokens)  # fmt: skip


@torch.no_grad()
def prefill(model, ids: torch.Tensor, row: Row, press: AbstractContextManager | None = None) -> None:
    """Prefill ``ids`` [1, L] into the row's cache (inside ``press``, e.g. a kvpress press, if given) in its
    session; the first token comes from the prefill's last logits, as in ``generate``."""
    with row.session():
        start = time.perf_counter()
        with press if press is not None else nullcontext():
            out = model(ids, past_key_values=row.cache, use_cache=True, logits_to_keep=1)
        row.prefill_s = time.perf_counter() - start
    row.kept = row.cache.get_seq_length()
    row.tokens.append(int(out.logits[:, -1:].argmax(-1)))


@torch.no_grad()
def shared_prefill(model, ids: torch.Tensor, rows: dict[str, Row]) -> None:
    """One exact chunked prefill of ``ids`` [1, L]; each row's cache gets a copy of its keys and values
    (a DASH-KV row codes them). A row's ``prefill_s`` is the shared prefill plus its own copy."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from dashkv.cache import DashKVLayer
    from dashkv.prefill import chunked_prefill

    start = time.perf_counter()
    cache, logits = chunked_prefill(model, ids, PREFILL_CHUNK, DynamicCache(config=model.config))
    shared = time.perf_counter() - start
    for row in rows.values():
        start = time.perf_counter()
        if type(row.cache) is DynamicCache:  # stock: the prefill's own kind of cache
            row.cache = copy.deepcopy(cache)
        else:
            for i, layer in enumerate(cache.layers):
                if isinstance(layer, DynamicSlidingWindowLayer):  # as transformers keeps them
                    row.cache.layers[i] = copy.deepcopy(layer)
                else:
                    row.cache.update(layer.keys, layer.values, i)
            for layer in row.cache.layers:
                if isinstance(layer, DashKVLayer) and layer.encoder is not None:
                    layer.code_views(pending=0)
        row.prefill_s = shared + time.perf_counter() - start
        row.kept = row.cache.get_seq_length()
        row.tokens.append(int(logits.argmax(-1)))


@torch.no_grad()
def decode(model, row: Row, length: int, count: int) -> None:
    """Decode ``count`` more tokens greedily in the row's session, timing each step and the attention
    calls in it. Steps pass their true positions (``L``, ``L + 1``, ...): a compressed cache holds fewer
    keys than positions, as in kvpress' own pipeline."""
    timer = AttentionTimer()
    with row.session(), timed_attention(model, timer):
        for _ in range(count):
            position = torch.tensor([[length + len(row.tokens) - 1]])
            token = torch.tensor([[row.tokens[-1]]])
            timer.seconds = 0.0
            start = time.perf_counter()
            out = model(token, past_key_values=row.cache, use_cache=True, position_ids=position)
            token = out.logits[:, -1:].argmax(-1)
            row.steps.append(time.perf_counter() - start)
            row.attention.append(timer.seconds)
            row.tokens.append(int(token))


def snapkv_press(model, length: int, kept: int, window: int) -> AbstractContextManager | None:
    """kvpress' ``SnapKVPress`` keeping exactly ``kept`` of ``length`` keys per KV head, as a context
    manager around the prefill; None when nothing would be dropped (short contexts)."""
    from kvpress import SnapKVPress

    if kept >= length or length <= window:
        return None
    ratio = 1.0 - (kept + 0.5) / length  # int(L * (1 - ratio)) == kept (the rule of baselines.presses)
    return SnapKVPress(compression_ratio=ratio, window_size=window)(model)


def _kvpress_available() -> bool:
    try:
        import kvpress  # noqa: F401
    except ImportError:
        return False
    return True


def _leading_equal(a: list[int], b: list[int]) -> int:
    """Leading tokens equal: greedy decoding diverges after the first difference, so later positions
    are not comparable."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(
    model, encoders, contexts: list[torch.Tensor], new_tokens: int, progress=None, warmup_tokens: int = 256,
    config=None, block: int = BLOCK,
) -> list[dict]:
    """Every row of :data:`ROWS` on each ``[1, n]`` context in turn (DASH-KV rows: ``config``, by default
    the default config with ``bits`` of ``encoders``, ``share`` set per row): each row prefills its
    own cache, then the rows decode in turns of ``block`` tokens.

    ``warmup_tokens`` > 0: first each row runs once, unrecorded, on that many tokens of the first
    context (thread pools, allocator, numba kernels loaded), DASH-KV rows with tiers at every length
    so that the tiered kernels are loaded too.
    """
    from transformers import DynamicCache

    import dashkv
    from dashkv.baselines.budget import Budget
    from dashkv.cache import DashKVCache
    from dashkv.models import sliding_windows

    config = config if config is not None else dashkv.DashKVConfig(bits=encoders.bits)
    budget = Budget(config.high + config.mid, config.sinks, config.window)
    # kvpress presses every layer alike: not models with sliding-window layers (their caches keep a window)
    with_snapkv = _kvpress_available() and not sliding_windows(model.config)
    shares = ("head", "group", "union")

    def rows(ids: torch.Tensor, tokens: int, config=config) -> tuple[dict[str, DecodeRun], dict[str, dict], float]:
        length = ids.shape[1]
        made: dict[str, Row] = {"full": Row(DynamicCache(config=model.config), nullcontext),
                                "full_inplace": Row(DashKVCache(None, config=model.config), nullcontext)}
        exact = dataclasses.replace(config, dense_layers=(), dense_below=length + tokens + 1)
        made["full_kernel"] = Row(DashKVCache(None, config=model.config),
                                  lambda: dashkv.enable(model, encoders, exact))  # fmt: skip
        stats: dict[str, object] = {}
        for share in shares:
            cfg = dataclasses.replace(config, share=share)

            def session(cfg=cfg, name=f"dashkv_{share}"):
                return _recording(dashkv.enable(model, encoders, cfg), stats, name)

            made[f"dashkv_{share}"] = Row(DashKVCache(encoders, cfg.dense_layers, config=model.config), session)
        if with_snapkv and length <= SINGLE_SHOT:  # kvpress compresses inside a single-shot prefill
            made["snapkv"] = Row(DynamicCache(config=model.config), nullcontext)
        with PeakRss() as rss:
            if length > SINGLE_SHOT:
                shared_prefill(model, ids, made)
            else:
                for name, row in made.items():
                    press = snapkv_press(model, length, budget.kept(length), config.window) if name == "snapkv" else None
                    prefill(model, ids, row, press)
            for done in range(1, tokens, block):  # the rows take turns: the same machine load for all
                for row in made.values():
                    decode(model, row, length, min(block, tokens - done))
        tiers = {name: summary.summary().get("mean", {}) for name, summary in stats.items()}
        return {name: row.result(length) for name, row in made.items()}, tiers, rss.peak / 2**20

    if warmup_tokens > 0 and contexts:
        rows(contexts[0][:, :warmup_tokens], 2, dataclasses.replace(config, dense_below=0))
    cases = []
    for ids in progress(contexts) if progress is not None else contexts:
        runs, tiers, peak = rows(ids, new_tokens)
        full = runs["full"]
        cases.append({
            "length": ids.shape[1],
            "peak_rss_mb": peak,
            "runs": {name: asdict(run) | {"vs_full": run.tokens_per_s / full.tokens_per_s,
                                          "same_tokens": _leading_equal(run.tokens, full.tokens)}
                     for name, run in runs.items()},
            "tiers": tiers,
        })  # fmt: skip
    return cases


class _recording(AbstractContextManager):
    """A ``dashkv.enable`` block whose tier counts are added to ``stats[name]`` (a :class:`TierStats`)."""

    def __init__(self, block: AbstractContextManager, stats: dict, name: str):
        self.block, self.stats, self.name = block, stats, name

    def __enter__(self):
        self.tier_stats = self.block.__enter__()
        return self.tier_stats

    def __exit__(self, *exc):
        from dashkv.stats import TierStats

        self.stats.setdefault(self.name, TierStats()).merge(self.tier_stats)
        return self.block.__exit__(*exc)


def check_options(
    lengths: tuple[int, ...], new_tokens: int, busy: int = 0, threads: int = 1, flags: bool = False
) -> None:
    """Raise ``ValueError`` naming the first bad option (before any model is loaded); ``flags``: name
    them as the command-line options (``--new-tokens 1``) instead of arguments (``new_tokens=1``)."""

    def fail(name: str, value: object, allowed: str) -> None:
        shown = f"--{name.replace('_', '-')} {value}" if flags else f"{name}={value!r}"
        raise ValueError(f"{shown} is not allowed; {allowed}")

    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        fail("lengths", ",".join(map(str, lengths)) if flags else lengths, "give one or more context lengths >= 1")
    if not isinstance(new_tokens, int) or new_tokens < 2:
        fail("new_tokens", new_tokens, "at least 2 (the first comes from the prefill)")
    if not isinstance(threads, int) or threads < 1:
        fail("threads", threads, "at least 1")
    if not isinstance(busy, int) or not 0 <= busy <= MAX_BUSY:
        fail("busy", busy, f"competitor processes from 0 to {MAX_BUSY}")


def run(
    lengths: tuple[int, ...] = LENGTHS,
    new_tokens: int = 32,
    threads: int = 2,
    model_name: str | None = None,
    output: Path | None = None,
    progress=None,
    busy: int = 0,
    dense_below: int | None = None,
) -> dict:
    """Decode speed of every row of :data:`ROWS` on a model (default: the embedded SmolLM2-135M), with
    its shipped encoders or else random ones; writes ``generate.json`` to ``output`` if given.

    Contexts longer than the model's position limit minus ``new_tokens`` are cut to it. ``busy``
    CPU-bound competitor processes (:class:`Competitors`) run during the whole measurement. DASH-KV rows
    run the default config, with ``dense_below`` (``DashKVConfig.dense_below``) if given.

    Raises
    ------
    ValueError
        For bad options (:func:`check_options`), before the model loads.
    """
    import numba

    check_options(tuple(lengths), new_tokens, busy, threads)
    previous = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        results = _measure(lengths, new_tokens, threads, model_name, progress, busy, dense_below)
    finally:  # a library call leaves the caller's thread settings as they were
        torch.set_num_threads(previous[0])
        numba.set_num_threads(previous[1])
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "generate.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def model_and_encoders(model_name: str | None):
    """``(model, tokenizer, encoders, source)``: the model's shipped encoders, or else random projection."""
    import dashkv
    from dashkv.shipped import shipped_encoders

    model, tokenizer = dashkv.load_model(model_name)
    try:
        return model, tokenizer, shipped_encoders(model), "shipped"
    except ValueError:
        bits = dashkv.DashKVConfig.bits
        return model, tokenizer, dashkv.HashEncoders.random(model, bits=bits, seed=0), f"random projection ({bits} bits, seed 0)"


def _measure(lengths, new_tokens: int, threads: int, model_name: str | None, progress, busy: int,
             dense_below: int | None = None) -> dict:
    """Load the model and its encoders, then :func:`compare` under ``busy`` competitors: the results."""
    import dashkv

    model, tokenizer, encoders, source = model_and_encoders(model_name)
    limit = getattr(model.config, "max_position_embeddings", None) or max(lengths) + new_tokens
    contexts = [context_ids(tokenizer, min(n, limit - new_tokens)) for n in lengths]
    config = dashkv.DashKVConfig(bits=encoders.bits)
    if dense_below is not None:
        config = dataclasses.replace(config, dense_below=dense_below)
    with Competitors(busy) as competitors:
        cases = compare(model, encoders, contexts, new_tokens, progress, config=config)
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": threads,
                    "cpus": os.cpu_count(), "torch": torch.__version__,
                    # the OpenMP pools' wait policy decides how a busy machine slows both methods down
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "")},
        "model": model_name or "SmolLM2-135M-Instruct (embedded)",
        "encoders": source,
        "config": config.to_dict(),
        "snapkv_keeps": "Budget(high + mid, sinks, window).kept(L) keys per KV head (DASH-KV's high + mid)",
        "prefill": f"each row its own, single-shot, up to {SINGLE_SHOT} tokens; above, one chunked prefill "
                   f"({PREFILL_CHUNK}-token chunks) copied by every row (no SnapKV row there)",
        "rows": {name: ROWS[name] for name in dict.fromkeys(name for case in cases for name in case["runs"])},
        "new_tokens": new_tokens,
        "block": BLOCK,
        "busy": competitors.record(),
        "cases": cases,
    }  # fmt: skip


def table(results: dict) -> str:
    """Markdown table: one line per context length and row."""
    lines = ["| context | method | decode ms/token (min-max) | tok/s | vs full | attention | prefill s | "
             "cache MB | tokens = full |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    labels = results.get("rows", ROWS)
    for case in results["cases"]:
        for name, r in case["runs"].items():
            kept = f" ({r['kept_tokens']} kept)" if r["kept_tokens"] != r["context_tokens"] else ""
            lines.append(
                f"| {r['context_tokens']}{kept} | {labels.get(name, name)} | {r['step_ms_median']:.1f} "
                f"({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}) | {r['tokens_per_s']:.1f} | {r['vs_full']:.2f} | "
                f"{r['attention_share']:.0%} | {r['prefill_s']:.2f} | {r['cache_mb']:.0f} | "
                f"{r['same_tokens']}/{len(r['tokens'])} |"
            )
    busy = results.get("busy", {}).get("processes", 0)
    load = f"; {busy} CPU-bound competitor processes running" if busy else ""
    below = results.get("config", {}).get("dense_below", 0)
    exact = f"; DASH-KV attends exactly below {below} keys (dense_below)" if below else ""
    peaks = ", ".join(f"{c['length']}: {c['peak_rss_mb']:.0f}" for c in results["cases"] if "peak_rss_mb" in c)
    lines.append(f"\nencoders: {results['encoders']}; {results['new_tokens']} new tokens per case, the rows taking "
                 f"turns of {results.get('block', BLOCK)}{load}{exact}" + (f"; peak RSS MB (all rows) {peaks}" if peaks else ""))
    return "\n".join(lines)
