"""End-to-end decode speed on a real model: stock full attention, the parts DASH-KV changes, and a
kvpress eviction baseline, in the same run.

For each context length (real prose from :mod:`dashkv.corpus`) every row prefills the context, then
decodes ``new_tokens`` tokens greedily, one forward a token, and each decode step is timed. The rows
run one after the other at each length, so that all see the same machine load:

- ``full``: stock full attention -- the model's SDPA over a transformers ``DynamicCache``, which
  concatenates the whole K and V at every step: what a user runs without DASH-KV;
- ``full_inplace``: the same attention over ``DashKVCache(None)``, the cache DASH-KV decodes from
  without key codes (preallocated, grows by doubling): what the cache alone buys;
- ``dashkv_head`` and ``dashkv_group``: DASH-KV with the shipped encoders (else random ones) and the
  default config, tiers chosen per query head and per GQA group (``DashKVConfig.share``);
- ``snapkv``: kvpress' ``SnapKVPress`` compressing the context during the prefill (the observation
  window is the config's ``window``), then full attention over the kept keys. It keeps as many keys
  per KV head as DASH-KV attends to in its high and mid tiers together: ``Budget(high + mid, sinks,
  window).kept(L)`` -- sinks, window and ``ceil((high + mid) * eligible)`` keys, the budget
  definition every method shares (:mod:`dashkv.baselines.budget`). The mid tier reads V rows like
  the high tier, so high + mid, not high alone, is the share of the cache a decode step uses.

Reported per row: decode ms per token (median; min-max), tokens/s, speed against ``full``
(``vs_full``, > 1 is faster), the share of decode time spent inside the attention function, prefill
seconds, peak resident memory (RSS) while the row ran, and how many leading tokens equal ``full``'s.

Attention time is measured by running the model with a registered attention function that times the
one it would call (``"sdpa"``, or ``"dashkv"`` under :func:`dashkv.enable`) -- no ``forward`` is
patched. It covers the attention call only: the projections, RoPE and the cache update (where
DASH-KV codes each new key) are outside it.

Importing kvpress wraps every registered attention function once (a check for head-wise masking, a
few attribute reads a call); it happens before any row runs, so every row pays it alike.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import platform
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

LENGTHS = (2048, 4096, 8192)
ROWS = {
    "full": "full attention (DynamicCache)",
    "full_inplace": "full attention (in-place cache)",
    "dashkv_head": "DASH-KV share=head",
    "dashkv_group": "DASH-KV share=group",
    "snapkv": "SnapKV (kvpress)",
}
MAX_BUSY = 64  # competitor processes; more is a typo, not a load


def _rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return 0


class PeakRss:
    """Context manager sampling the RSS every ``interval`` seconds; ``peak`` is the largest sample."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


# ------------------------------------------------------------------------------ competitor load


def _spin() -> None:  # pragma: no cover - runs in the competitor processes
    """A CPU-bound competitor: an integer loop in pure Python until terminated."""
    x = 0
    try:
        while True:
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: leave without a traceback
        pass


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Competitors:
    """``n`` CPU-bound processes (:func:`_spin`) running for the length of a ``with`` block: a loaded
    machine. They are terminated on exit, also on an error or Ctrl-C, and are daemons, so they do not
    outlive this process either.

    ``record()`` says what ran and how many CPU seconds each competitor got (that they competed).
    """

    def __init__(self, n: int):
        check_options((1,), 2, busy=n)
        self.n = n
        self.processes: list[multiprocessing.Process] = []
        self.cpu_seconds: list[float | None] = []

    def __enter__(self) -> "Competitors":
        # fork: the child runs a pure-Python loop and touches nothing of the parent (spawn would
        # re-import torch in every competitor)
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        try:
            for i in range(self.n):
                process = context.Process(target=_spin, name=f"dashkv-busy-{i}", daemon=True)
                process.start()
                self.processes.append(process)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Terminate (then kill, if need be) every competitor; safe to call twice."""
        if self.processes and not self.cpu_seconds:
            self.cpu_seconds = [_cpu_seconds(p.pid) for p in self.processes]
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()

    def record(self) -> dict:
        return {"processes": self.n, "work": "pure-Python integer loop, one process each",
                "cpu_seconds": self.cpu_seconds}  # fmt: skip


# ------------------------------------------------------------------------------- attention timing


class AttentionTimer:
    """Seconds spent in the model's attention function since ``seconds`` was last set to 0."""

    def __init__(self) -> None:
        self.seconds = 0.0


@contextmanager
def timed_attention(model, timer: AttentionTimer) -> Iterator[AttentionTimer]:
    """Run ``model`` with its current attention function timed by ``timer``.

    Registers ``"timed_<name>"`` (through transformers' ``AttentionInterface``, with the mask function
    of ``<name>``, so masks are built exactly as before) as a function that calls the registered
    ``<name>`` and adds its wall time to ``timer.seconds``, sets the model's attention implementation
    to it, and restores ``<name>`` on exit. Inside :func:`dashkv.enable`, ``<name>`` is ``"dashkv"``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    previous = model.config._attn_implementation
    if previous not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        raise ValueError(f"attention implementation {previous!r} is not a registered function; cannot time it")
    inner = ALL_ATTENTION_FUNCTIONS[previous]

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            timer.seconds += time.perf_counter() - start

    name = f"timed_{previous}"
    AttentionInterface.register(name, timed)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    model.set_attn_implementation(name)
    try:
        yield timer
    finally:
        model.set_attn_implementation(previous)


# --------------------------------------------------------------------------------------- decode


@dataclass
class DecodeRun:
    """One row at one context length.

    ``kept_tokens``: keys in the cache after the prefill (fewer than ``context_tokens`` for SnapKV);
    ``attention_share``: attention seconds / decode seconds over all steps; ``attention_ms_median``:
    the median step's attention time.
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
    peak_rss_mb: float
    tokens: list[int]


def context_ids(tokenizer, length: int) -> torch.Tensor:
    """``[1, length]`` token ids of real prose (the corpus, repeated if it is shorter)."""
    from dashkv import corpus

    ids = tokenizer(corpus.text("eval"), return_tensors="pt").input_ids
    while ids.shape[1] < length:
        ids = torch.cat([ids, ids], dim=1)
    return ids[:, :length]


@torch.no_grad()
def decode(
    model, ids: torch.Tensor, new_tokens: int, cache, prefill: AbstractContextManager | None = None
) -> DecodeRun:
    """Prefill ``ids`` [1, L] into ``cache`` (inside ``prefill``, e.g. a kvpress press, if given), then
    greedy-decode ``new_tokens`` tokens (the first from the prefill), timing each step and the
    attention calls in it.

    Decode steps pass their true positions (``L``, ``L + 1``, ...): a compressed cache holds fewer
    keys than positions, as in kvpress' own pipeline. The prefill keeps the last position's logits
    only, as ``generate`` does.
    """
    length = ids.shape[1]
    timer = AttentionTimer()
    with PeakRss() as rss, timed_attention(model, timer):
        start = time.perf_counter()
        with prefill if prefill is not None else nullcontext():
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - start
        kept = cache.get_seq_length()
        token = out.logits[:, -1:].argmax(-1)
        tokens, steps, attention = [int(token)], [], []
        for i in range(new_tokens - 1):
            position = torch.tensor([[length + i]], device=ids.device)
            timer.seconds = 0.0
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True, position_ids=position)
            token = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - start)
            attention.append(timer.seconds)
            tokens.append(int(token))
    median = statistics.median(steps)
    return DecodeRun(length, kept, prefill_s, median * 1e3, min(steps) * 1e3, max(steps) * 1e3, 1.0 / median,
                     statistics.median(attention) * 1e3, sum(attention) / sum(steps), rss.peak / 2**20, tokens)


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
    config=None,
) -> list[dict]:
    """Every row of :data:`ROWS` on each ``[1, n]`` context in turn (DASH-KV rows: ``config``, by default
    the default config with ``bits`` of ``encoders``, ``share`` set per row).

    ``warmup_tokens`` > 0: first each row runs once, unrecorded, on that many tokens of the first
    context (thread pools, allocator, numba kernels loaded).
    """
    from transformers import DynamicCache

    import dashkv
    from dashkv.baselines.budget import Budget
    from dashkv.cache import DashKVCache

    config = config if config is not None else dashkv.DashKVConfig(bits=encoders.bits)
    budget = Budget(config.high + config.mid, config.sinks, config.window)
    with_snapkv = _kvpress_available()

    def rows(ids: torch.Tensor, tokens: int) -> tuple[dict[str, DecodeRun], dict[str, dict]]:
        runs, tiers = {}, {}
        runs["full"] = decode(model, ids, tokens, DynamicCache())
        runs["full_inplace"] = decode(model, ids, tokens, DashKVCache(None))
        for share in ("head", "group"):
            cfg = dataclasses.replace(config, share=share)
            with dashkv.enable(model, encoders, cfg) as stats:
                runs[f"dashkv_{share}"] = decode(model, ids, tokens, DashKVCache(encoders, cfg.dense_layers))
            tiers[f"dashkv_{share}"] = stats.summary().get("mean", {})
        if with_snapkv:
            length = ids.shape[1]
            press = snapkv_press(model, length, budget.kept(length), config.window)
            runs["snapkv"] = decode(model, ids, tokens, DynamicCache(), prefill=press)
        return runs, tiers

    if warmup_tokens > 0 and contexts:
        rows(contexts[0][:, :warmup_tokens], 2)
    cases = []
    for ids in progress(contexts) if progress is not None else contexts:
        runs, tiers = rows(ids, new_tokens)
        full = runs["full"]
        cases.append({
            "length": ids.shape[1],
            "runs": {name: asdict(run) | {"vs_full": run.tokens_per_s / full.tokens_per_s,
                                          "same_tokens": _leading_equal(run.tokens, full.tokens)}
                     for name, run in runs.items()},
            "tiers": tiers,
        })  # fmt: skip
    return cases


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


def _measure(lengths, new_tokens: int, threads: int, model_name: str | None, progress, busy: int,
             dense_below: int | None = None) -> dict:
    """Load the model and its encoders, then :func:`compare` under ``busy`` competitors: the results."""
    import dashkv
    from dashkv.shipped import shipped_encoders

    model, tokenizer = dashkv.load_model(model_name)
    try:
        encoders, source = shipped_encoders(model), "shipped"
    except ValueError:
        bits = dashkv.DashKVConfig.bits
        encoders = dashkv.HashEncoders.random(model, bits=bits, seed=0)
        source = f"random projection ({bits} bits, seed 0)"
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
        "rows": {name: label for name, label in ROWS.items() if name != "snapkv" or _kvpress_available()},
        "new_tokens": new_tokens,
        "busy": competitors.record(),
        "cases": cases,
    }  # fmt: skip


def table(results: dict) -> str:
    """Markdown table: one line per context length and row."""
    lines = ["| context | method | decode ms/token (min-max) | tok/s | vs full | attention | prefill s | "
             "peak RSS MB | tokens = full |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    labels = results.get("rows", ROWS)
    for case in results["cases"]:
        for name, r in case["runs"].items():
            kept = f" ({r['kept_tokens']} kept)" if r["kept_tokens"] != r["context_tokens"] else ""
            lines.append(
                f"| {r['context_tokens']}{kept} | {labels.get(name, name)} | {r['step_ms_median']:.1f} "
                f"({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}) | {r['tokens_per_s']:.1f} | {r['vs_full']:.2f} | "
                f"{r['attention_share']:.0%} | {r['prefill_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                f"{r['same_tokens']}/{len(r['tokens'])} |"
            )
    busy = results.get("busy", {}).get("processes", 0)
    load = f"; {busy} CPU-bound competitor processes running" if busy else ""
    below = results.get("config", {}).get("dense_below", 0)
    exact = f"; DASH-KV attends exactly below {below} keys (dense_below)" if below else ""
    lines.append(f"\nencoders: {results['encoders']}; {results['new_tokens']} new tokens per case{load}{exact}")
    return "\n".join(lines)
