"""Prefill speed and its cost in fidelity: dense, tiered and block prefill of one context, in one run.

Each mode fills a cache with the context's first ``L - tail`` tokens through
:func:`dashkv.prefill.chunked_prefill` (``PREFILL_CHUNK``-token chunks, timed), then runs the last
``tail`` tokens as one block in the same mode, whose logits are compared with the dense prefill's:
next-token KL, perplexity of the tail and the share of positions with the same argmax. The tail is
where a prefill's errors show: every layer's cache was built through it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from dashkv.bench.generate import PREFILL_CHUNK, context_ids, model_and_encoders

MODES = ("dense", "tiered", "blocks")
TAIL = 256


def prefill_mode(model, encoders, ids: torch.Tensor, mode: str, config, tail: int = TAIL) -> tuple[float, torch.Tensor]:
    """Seconds of the chunked prefill of ``ids[:, :-tail]`` in ``mode`` (``"dense"``: no DASH-KV) and
    the log-probabilities of the tail's tokens, Tensor[tail, V] float32."""
    import dataclasses

    import dashkv
    from dashkv.cache import DashKVCache
    from dashkv.prefill import chunked_prefill
    from transformers.cache_utils import DynamicCache

    length = ids.shape[1]
    head, rest = ids[:, : length - tail], ids[:, length - tail :]
    positions = torch.arange(length - tail, length)

    def run(cache) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        chunked_prefill(model, head, PREFILL_CHUNK, cache)
        seconds = time.perf_counter() - start
        out = model(input_ids=rest, position_ids=positions.view(1, -1), cache_position=positions,
                    past_key_values=cache, use_cache=True)  # fmt: skip
        return seconds, out.logits[0].float().log_softmax(-1)

    with torch.no_grad():
        if mode == "dense":
            return run(DynamicCache(config=model.config))
        config = dataclasses.replace(config, prefill=mode)
        cache = DashKVCache(encoders, config.dense_layers, config=model.config)
        with dashkv.enable(model, encoders, config):
            return run(cache)


def compare_tail(dense: torch.Tensor, other: torch.Tensor, targets: torch.Tensor) -> dict:
    """``KL(P_dense || P_other)`` averaged over the tail, the other's perplexity of ``targets`` (the tail's
    next tokens) and the share of positions whose argmax agrees."""
    nll = float(-other[:-1].gather(-1, targets.view(-1, 1)).mean())
    return {
        "kl": float((dense.exp() * (dense - other)).sum(-1).mean()),
        "tail_ppl": math.exp(nll),
        "same_argmax": float((dense.argmax(-1) == other.argmax(-1)).float().mean()),
    }


def compare(model, encoders, contexts: list[torch.Tensor], modes: tuple[str, ...], config, tail: int = TAIL,
            progress=None) -> list[dict]:  # fmt: skip
    """Every mode on every context; the dense prefill first (the baseline of the ratios)."""
    cases = []
    for ids in progress(contexts) if progress else contexts:
        dense_s, dense = prefill_mode(model, encoders, ids, "dense", config, tail)
        targets = ids[0, ids.shape[1] - tail + 1 :]
        runs = {"dense": {"prefill_s": dense_s, "vs_dense": 1.0, **compare_tail(dense, dense, targets)}}
        for mode in modes:
            if mode != "dense":
                seconds, logp = prefill_mode(model, encoders, ids, mode, config, tail)
                runs[mode] = {"prefill_s": seconds, "vs_dense": dense_s / seconds, **compare_tail(dense, logp, targets)}
        cases.append({"length": ids.shape[1], "tail": tail, "runs": runs})
    return cases


def check_options(lengths: tuple[int, ...], modes: tuple[str, ...]) -> None:
    """``ValueError`` naming the option unless every mode is known and every length holds a tail and a chunk."""
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"--modes {','.join(modes)}: choose from {', '.join(MODES)}")
    if not lengths or any(n <= TAIL + PREFILL_CHUNK for n in lengths):
        raise ValueError(f"--lengths {','.join(map(str, lengths))}: every length must exceed {TAIL + PREFILL_CHUNK} "
                         "tokens (the tail and one chunk)")  # fmt: skip


def run(lengths: tuple[int, ...], modes: tuple[str, ...] = MODES, model_name: str | None = None,
        output: Path | None = None, threads: int = 2, progress=None) -> dict:  # fmt: skip
    """:func:`compare` on a model (default: the embedded SmolLM2-135M) with its shipped encoders (else
    random projection) and the default config; writes ``prefill.json`` to ``output`` if given."""
    import dashkv

    check_options(lengths, modes)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, tokenizer, encoders, source = model_and_encoders(model_name)
        limit = getattr(model.config, "max_position_embeddings", None) or max(lengths)
        contexts = [context_ids(tokenizer, min(n, limit)) for n in lengths]
        config = dashkv.DashKVConfig(bits=encoders.bits)
        cases = compare(model, encoders, contexts, tuple(modes), config, progress=progress)
    finally:
        torch.set_num_threads(previous)
    results = {"model": model_name or "SmolLM2-135M-Instruct (embedded)", "encoders": source, "threads": threads,
               "config": config.to_dict(), "chunk": PREFILL_CHUNK, "cases": cases}  # fmt: skip
    if output is not None:
        Path(output).mkdir(parents=True, exist_ok=True)
        (Path(output) / "prefill.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(results: dict) -> str:
    lines = ["| context | mode | prefill s | × dense | tail KL | tail perplexity | same argmax |",
             "|---|---|---|---|---|---|---|"]
    for case in results["cases"]:
        for mode, r in case["runs"].items():
            lines.append(f"| {case['length']} | {mode} | {r['prefill_s']:.1f} | {r['vs_dense']:.2f} | {r['kl']:.4f} | "
                         f"{r['tail_ppl']:.3f} | {r['same_argmax']:.3f} |")  # fmt: skip
    return "\n".join(lines)
