"""End-to-end decode speed: full attention against DASH-KV on a real model, in the same run.

For each context length: the context (real prose from :mod:`dashkv.corpus`) is prefilled densely,
then ``new_tokens`` tokens are decoded greedily one forward at a time, and each decode step is
timed. Full attention and DASH-KV alternate, one context length after the other, so that both see
the same machine load. Reported per method: decode tokens/s (median step time; min-max), prefill
seconds, and the peak resident memory (RSS) while the method ran, sampled from ``/proc``.
"""

from __future__ import annotations

import json
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

LENGTHS = (2048, 4096, 8192)


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


@dataclass
class DecodeRun:
    """One method at one context length."""

    context_tokens: int
    prefill_s: float
    step_ms_median: float
    step_ms_min: float
    step_ms_max: float
    tokens_per_s: float
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
def decode(model, ids: torch.Tensor, new_tokens: int, cache) -> DecodeRun:
    """Prefill ``ids`` into ``cache``, then greedy-decode ``new_tokens`` tokens, timing each step."""
    with PeakRss() as rss:
        start = time.perf_counter()
        out = model(ids, past_key_values=cache, use_cache=True)
        prefill = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        tokens, steps = [int(token)], []
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - start)
            tokens.append(int(token))
    median = statistics.median(steps)
    return DecodeRun(ids.shape[1], prefill, median * 1e3, min(steps) * 1e3, max(steps) * 1e3, 1.0 / median,
                     rss.peak / 2**20, tokens)


def compare(model, encoders, contexts: list[torch.Tensor], new_tokens: int, progress=None) -> list[dict]:
    """Full attention, then DASH-KV (default config, ``encoders``), on each ``[1, n]`` context in turn."""
    from transformers import DynamicCache

    import dashkv
    from dashkv.cache import DashKVCache

    config = dashkv.DashKVConfig(bits=encoders.bits)
    cases = []
    for ids in progress(contexts) if progress is not None else contexts:
        full = decode(model, ids, new_tokens, DynamicCache())
        with dashkv.enable(model, encoders, config) as stats:
            hashed = decode(model, ids, new_tokens, DashKVCache(encoders, config.dense_layers))
        cases.append({
            "length": ids.shape[1],
            "full": asdict(full),
            "dashkv": asdict(hashed),
            "speedup": hashed.tokens_per_s / full.tokens_per_s,
            "same_tokens": sum(a == b for a, b in zip(full.tokens, hashed.tokens)),
            "tiers": stats.summary().get("mean", {}),
        })  # fmt: skip
    return cases


def run(
    lengths: tuple[int, ...] = LENGTHS,
    new_tokens: int = 32,
    threads: int = 2,
    model_name: str | None = None,
    output: Path | None = None,
    progress=None,
) -> dict:
    """Full attention vs DASH-KV decode speed on a model (default: the embedded SmolLM2-135M), with
    its shipped encoders or else random ones; writes ``generate.json`` to ``output`` if given.

    Contexts longer than the model's position limit minus ``new_tokens`` are cut to it.
    """
    import numba

    import dashkv
    from dashkv.shipped import shipped_encoders

    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens} is too few: at least 2 (the first comes from the prefill)")
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    model, tokenizer = dashkv.load_model(model_name)
    try:
        encoders, source = shipped_encoders(model), "shipped"
    except ValueError:
        bits = dashkv.DashKVConfig.bits
        encoders, source = dashkv.HashEncoders.random(model, bits=bits, seed=0), f"random projection ({bits} bits, seed 0)"
    limit = getattr(model.config, "max_position_embeddings", None) or max(lengths) + new_tokens
    contexts = [context_ids(tokenizer, min(n, limit - new_tokens)) for n in lengths]
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": threads,
                    "torch": torch.__version__},
        "model": model_name or "SmolLM2-135M-Instruct (embedded)",
        "encoders": source,
        "config": dashkv.DashKVConfig(bits=encoders.bits).to_dict(),
        "new_tokens": new_tokens,
        "cases": compare(model, encoders, contexts, new_tokens, progress),
    }  # fmt: skip
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "generate.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(results: dict) -> str:
    """Markdown table: decode tokens/s and peak RSS of both methods per context length."""
    lines = ["| context | full tok/s | DASH-KV tok/s | × | full step ms (min-max) | DASH-KV step ms (min-max) | "
             "full peak RSS MB | DASH-KV peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        f, d = c["full"], c["dashkv"]
        lines.append(
            f"| {f['context_tokens']} | {f['tokens_per_s']:.1f} | {d['tokens_per_s']:.1f} | {c['speedup']:.2f} | "
            f"{f['step_ms_median']:.1f} ({f['step_ms_min']:.1f}-{f['step_ms_max']:.1f}) | "
            f"{d['step_ms_median']:.1f} ({d['step_ms_min']:.1f}-{d['step_ms_max']:.1f}) | "
            f"{f['peak_rss_mb']:.0f} | {d['peak_rss_mb']:.0f} |"
        )
    lines.append(f"\nencoders: {results['encoders']}; {results['new_tokens']} new tokens per case")
    return "\n".join(lines)
