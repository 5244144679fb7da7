"""The held-out quality report that ``dashkv train`` prints and stores in ``metrics.json``."""

from __future__ import annotations

import torch
from tqdm import tqdm

from dashkv import corpus
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders
from dashkv.models import attention_scaling
from dashkv.training.collect import collect, token_windows
from dashkv.training.report import gap_closed, layer_report, next_token_kl

# (context length, stride between windows, earliest query position). The held-out text has about 11K
# tokens, so 8K windows overlap (one 8K window alone gave recall numbers that a second text contradicted);
# queries sit in the later part of each window, where there are many keys to rank.
LENGTHS = ((2048, 2048, 1024), (8192, 1024, 2048))
QUERIES_PER_WINDOW = 64


def held_out_report(model, tokenizer, encoders: HashEncoders, cfg, echo=print) -> dict:
    """Recall, output error and next-token KL on held-out text at 2K and 8K tokens."""
    random = HashEncoders.random(model, bits=encoders.bits, seed=cfg.seed + 1).to(model.device)
    config = DashKVConfig(bits=encoders.bits, high=cfg.high, mid=cfg.mid, sinks=cfg.sinks, window=cfg.window,
                          dense_layers=cfg.dense_layers, momentum=False, dense_below=0)
    text = corpus.text("eval")
    results = {}
    for length, stride, min_position in LENGTHS:
        windows = token_windows(tokenizer, text, length, stride=stride)
        signals = collect(model, windows, QUERIES_PER_WINDOW, min_position, seed=1, keep_values=True,
                          progress=lambda xs: tqdm(xs, desc=f"held-out {length}"))
        rows = layer_report(encoders, random, signals, config, scaling=attention_scaling(model))
        del signals
        ids = windows[0].view(1, -1)
        kls = next_token_kl(model, ids, {"trained": encoders, "random": random}, config)
        rows["mean"]["next_token_kl_trained"], rows["mean"]["next_token_kl_random"] = kls["trained"], kls["random"]
        rows["mean"]["gap_closed@5%"] = gap_closed(rows["mean"])
        results[str(length)] = rows
        echo(format_table(length, rows))
    return results


def format_table(length: int, rows: dict) -> str:
    mean = rows["mean"]
    lines = [f"\nheld-out, {length} tokens (keys outside sinks and window; mean over tiered layers)",
             f"{'layer':>6} {'oracle@5':>9} {'trained@5':>10} {'random@5':>9} {'trained@10':>11} {'random@10':>10}"]
    for layer, r in rows.items():
        lines.append(f"{layer!s:>6} {r['oracle_high@5%']:9.3f} {r['trained_high@5%']:10.3f} {r['random_high@5%']:9.3f} "
                     f"{r['trained_high@10%']:11.3f} {r['random_high@10%']:10.3f}")
    lines.append(f"gap closed at 5 %: {mean['gap_closed@5%']:.2f}; high+mid recall @5 %: trained "
                 f"{mean['trained_high+mid@5%']:.3f}, random {mean['random_high+mid@5%']:.3f}")
    lines.append(f"output error: trained {mean.get('output_error_trained', float('nan')):.3f}, random "
                 f"{mean.get('output_error_random', float('nan')):.3f}; next-token KL: trained "
                 f"{mean['next_token_kl_trained']:.4f}, random {mean['next_token_kl_random']:.4f}")
    return "\n".join(lines)
