"""Decode-step attention latency: dense SDPA against DASH-KV, timed in the same run.

For each cache length S and head shape, one decode token (T = 1), fp32: dense
``scaled_dot_product_attention`` (GQA), the fused DASH-KV kernel (``ops.cpu.dash_attention``:
distances, tiers, exact high tier and estimated mid tier), the same kernel with the high tier only,
the whole method step (``attention.tiered_step``: query encoding, consensus, the fused kernel), and
the memory floor of the fused kernel's tiers (:mod:`dashkv.bench.floor`: reading the key codes and
the K/V rows it reads, and nothing else). Timings interleave the methods, repeat, and report median
and min-max. Also: the machine's read bandwidth measured in the same run, the GB/s of the code scan
alone (the fused kernel's first pass: distances to every key code and their histograms), and the
cost of encoding a query and of coding one new key.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from dashkv.attention import always_high, layer_plan, tiered_step, visibility
from dashkv.config import DashKVConfig
from dashkv.encoders import LayerHashEncoder
from dashkv.ops.reference import MidTierInputs, budget_counts, expand_kv

METHODS = {
    "sdpa": "dense SDPA",
    "dashkv_fused": "DASH-KV fused kernel (high + mid)",
    "dashkv_high": "DASH-KV fused kernel, high tier only",
    "dashkv_step": "DASH-KV method step, tiers per query head (encode + calibration + fused)",
    "dashkv_step_group": "DASH-KV method step, tiers per GQA group",
    "dashkv_step_union": "DASH-KV method step, per-head tiers joined over the GQA group",
    "dashkv_floor": "reads alone (codes, K of high, V of high + mid): the memory floor",
    "dashkv_dense": "full attention, dashkv's dense kernel (K and V read once per GQA group)",
}
SHAPES = {"smollm2": (9, 3, 64), "llama3-8b": (32, 8, 128), "gemma-3-270m": (4, 1, 256)}
SIZES = (1024, 4096, 16384, 32768, 65536, 131072)


@dataclass
class Timing:
    """Milliseconds over repeats: median, min, max."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, samples: list[float]) -> "Timing":
        ms = [s * 1e3 for s in samples]
        return cls(statistics.median(ms), min(ms), max(ms))


def _time(fns: dict, repeats: int, warmup: int) -> dict[str, Timing]:
    """Run every function ``warmup`` times, then ``repeats`` rounds interleaving them (shared noise)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: Timing.of(s) for name, s in samples.items()}


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """GB/s of summing a large fp32 tensor (a streaming read), best of ``repeats``."""
    data = torch.ones(megabytes * 2**20 // 4)
    best = min(_timed(lambda: data.sum()) for _ in range(repeats))
    return data.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _mid_inputs(encoder: LayerHashEncoder, query: torch.Tensor, key_norms: torch.Tensor, bits: int) -> MidTierInputs:
    """What the mid tier reads besides q, K and V, as :func:`dashkv.attention.tiered_step` builds it."""
    center = expand_kv(encoder.key_center.unsqueeze(0), query.shape[1])[0]
    return MidTierInputs(
        dist=None, query_codes=None, key_codes=None, bits=bits, query_norm=query.norm(dim=-1), key_norm=key_norms,
        query_dot_center=torch.einsum("bhtd,hd->bht", query, center), temperature=encoder.mid_temperature.detach(),
        bias=encoder.mid_bias.detach(), residual=encoder.residual.detach(),
    )  # fmt: skip


@torch.no_grad()  # as a decode step runs (generate): the compiled query encoder, no autograd graph
def bench_case(shape: str, seq: int, config: DashKVConfig, repeats: int, warmup: int, seed: int = 0) -> dict:
    """Time one (shape, S) case; returns a JSON-ready dict.

    Methods, interleaved in every repeat: ``sdpa`` (dense, GQA), ``dashkv_fused`` (the fused kernel:
    distances, tiers, exact high + estimated mid tier), ``dashkv_high`` (the same with ``mid = 0``:
    high tier only) and ``dashkv_step`` (the whole method step: query encoding, consensus, the fused
    kernel, probabilities and tiers for the cache statistics) and ``dashkv_floor`` (reading the codes
    and the rows that the fused kernel's tiers read, and nothing else: :mod:`dashkv.bench.floor`).
    """
    from dashkv.bench import floor
    from dashkv.ops import cpu

    heads, kv_heads, dim = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(1, heads, 1, dim, generator=gen)
    key = torch.randn(1, kv_heads, seq, dim, generator=gen)
    value = torch.randn(1, kv_heads, seq, dim, generator=gen)
    encoder = LayerHashEncoder(heads, kv_heads, dim, config.bits).eval()
    with torch.no_grad():
        encoder.key_proj.normal_(generator=gen)
        encoder.query_skip.copy_(encoder.key_proj.repeat_interleave(heads // kv_heads, dim=0))
    codes, norms = encoder.encode_key(key)
    query_codes = encoder.encode_query(query)
    visible = visibility(1, 1, seq, None, query.device)
    always = always_high(visible, config.sinks, config.window)
    n = (visible & ~always).sum(-1)
    k_high = budget_counts(n, config.high)
    k_mid = budget_counts(n, config.high + config.mid) - k_high
    mid = _mid_inputs(encoder, query, norms, config.bits)
    scaling = dim**-0.5

    def dense():
        torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)

    def fused():
        cpu.dash_attention(query, key, value, query_codes, codes, k_high, k_mid, scaling, visible, always, mid)

    def high_only():
        cpu.dash_attention(query, key, value, query_codes, codes, k_high, k_mid * 0, scaling, visible, always)

    prior = torch.softmax(torch.randn(1, 1, seq, generator=gen) * 3, dim=-1)  # a previous layer's

    def method(cfg: DashKVConfig):  # as the decode path calls it: the layer's plan made once, momentum
        # prior in and out, no weights
        plan = layer_plan(cpu, encoder, cfg, heads, kv_heads, scaling, want_prior=cfg.momentum, want_weights=False)
        return lambda: tiered_step(query, key, value, codes, norms, encoder, cfg, visible, scaling, prior, cpu,
                                   always=always, want_prior=cfg.momentum, want_weights=False, plan=plan)  # fmt: skip

    _, _, tiers = cpu.dash_attention(
        query, key, value, query_codes, codes, k_high, k_mid, scaling, visible, always, mid, return_tiers=True
    )
    lists = floor.row_lists(tiers, cpu.CHUNK)
    flat_k, flat_v = (t[0].reshape(-1, dim).numpy() for t in (key, value))
    flat_codes = codes[0].reshape(kv_heads * seq, -1).numpy()
    rows_sum = torch.empty(heads, -(-seq // cpu.CHUNK), dim).numpy()
    codes_mix = torch.empty(kv_heads, -(-seq // cpu.CHUNK), dtype=torch.int64).numpy()

    def row_reads():
        floor.read_rows(flat_k, flat_v, flat_codes, *lists, kv_heads, cpu.CHUNK, rows_sum, codes_mix)

    fns = {"sdpa": dense, "dashkv_fused": fused, "dashkv_high": high_only,
           "dashkv_step": method(replace(config, share="head")),
           "dashkv_step_group": method(replace(config, share="group")),
           "dashkv_step_union": method(replace(config, share="union")), "dashkv_floor": row_reads,
           "dashkv_dense": lambda: cpu.dense_attention(query, key, value, visible, scaling)}
    timings = _time(fns, repeats, warmup)
    scan = _time({"scan": cpu.code_scan_plan(query_codes, codes)}, repeats, warmup)["scan"]
    encode_query = _time({"q": lambda: encoder.encode_query(query)}, repeats, warmup)["q"]
    new_key = key[:, :, :1]
    encode_key = _time({"k": lambda: encoder.encode_key(new_key)}, repeats, warmup)["k"]
    code_bytes = codes.numel() * 8
    return {
        "shape": shape,
        "seq": seq,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": dim,
        **{name: asdict(t) for name, t in timings.items()},
        **{f"speedup_{name[7:]}": timings["sdpa"].median / timings[name].median for name in fns if name != "sdpa"},
        "fused_over_floor": timings["dashkv_fused"].median / timings["dashkv_floor"].median,
        "dense_kv_bytes": 2 * key.numel() * 4,
        "code_bytes": code_bytes,
        "code_scan_ms": asdict(scan),
        "code_scan_gbps": code_bytes / (scan.median / 1e3) / 1e9,
        "encode_query_ms": asdict(encode_query),
        "encode_new_key_ms": asdict(encode_key),
    }


def slopes(results: dict, low: int = 16384, high: int = 131072) -> dict:
    """Log-log slope of median time against S between ``low`` and ``high`` keys, per shape and method."""
    out: dict = {}
    for shape in sorted({c["shape"] for c in results["cases"]}):
        cases = {c["seq"]: c for c in results["cases"] if c["shape"] == shape}
        if low in cases and high in cases:
            out[shape] = {
                name: math.log(cases[high][name]["median"] / cases[low][name]["median"]) / math.log(high / low)
                for name in METHODS
            }
    return out


def run(
    sizes: tuple[int, ...] = SIZES,
    shapes: tuple[str, ...] = ("smollm2", "llama3-8b"),
    repeats: int = 15,
    warmup: int = 3,
    threads: int = 2,
    output: Path | None = None,
    progress=None,
    bandwidth_mb: int = 512,
    bits: int = DashKVConfig.bits,
    device: str = "cpu",
    batches: tuple[int, ...] | None = None,
) -> dict:
    """The whole benchmark; writes ``attention.json`` and ``attention.png`` to ``output`` if given.

    ``device="cuda"``: the GPU benchmark instead (:mod:`dashkv.bench.attention_gpu`: bf16, ``batches``
    (default 1 and 8), SDPA against the Triton step); ``threads`` and ``bandwidth_mb`` are not used.
    """
    if torch.device(device).type == "cuda":
        from dashkv.bench import attention_gpu as gpu

        def write(results: dict) -> None:
            if output is not None:
                Path(output).mkdir(parents=True, exist_ok=True)
                (Path(output) / "attention_gpu.json").write_text(json.dumps(results, indent=2) + "\n")

        results = gpu.run_gpu(sizes, shapes, batches or gpu.GPU_BATCHES, repeats=repeats, warmup=warmup, bits=bits,
                              progress=progress, checkpoint=write)  # fmt: skip
        write(results)
        if output is not None:
            gpu.plot_gpu(results, Path(output) / "attention_gpu.png")
        return results
    if torch.device(device).type != "cpu":
        raise ValueError(f"device={device!r} is not supported; choose 'cpu' or 'cuda'")
    import numba

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    # the default calibration, as a decode step runs it: consensus, and momentum reading one prior and
    # writing the next layer's
    config = DashKVConfig(bits=bits, high=0.05, mid=0.15, consensus=True, momentum=True)
    cases = [(shape, seq) for shape in shapes for seq in sizes]
    iterator = progress(cases) if progress is not None else cases
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": threads,
                    "torch": torch.__version__, "read_bandwidth_gbps": read_bandwidth(bandwidth_mb)},
        "config": config.to_dict(),
        "cases": [bench_case(shape, seq, config, repeats, warmup) for shape, seq in iterator],
    }
    results["slopes_16k_128k"] = slopes(results)
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "attention.json").write_text(json.dumps(results, indent=2) + "\n")
        plot(results, output / "attention.png")
    return results


def plot(results: dict, path: Path) -> None:
    """Log-log time against S, one panel per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({c["shape"] for c in results["cases"]})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        cases = [c for c in results["cases"] if c["shape"] == shape]
        seqs = [c["seq"] for c in cases]
        for name, label in METHODS.items():
            med = [c[name]["median"] for c in cases]
            ax.loglog(seqs, med, marker="o", label=label)
            ax.fill_between(seqs, [c[name]["low"] for c in cases], [c[name]["high"] for c in cases], alpha=0.15)
        threads = results["machine"]["threads"]
        ax.set_title(f"{shape}: one decode token, fp32, {threads} thread{'s' if threads != 1 else ''}")
        ax.set_xlabel("keys in cache (S)")
        ax.set_ylabel("ms (median)")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # the shared legend sits below the panels
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict) -> str:
    """Markdown table of the cases: medians in ms and speed-ups over SDPA in the same run."""
    lines = ["| shape | S | SDPA ms | fused ms | fused × | high-only ms | high-only × | step ms | step × | "
             "group step ms | group step × | union step ms | union step × | floor ms | floor × | dense kernel ms | "
             "dense kernel × | scan GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        lines.append(
            f"| {c['shape']} | {c['seq']} | {c['sdpa']['median']:.2f} | {c['dashkv_fused']['median']:.2f} | "
            f"{c['speedup_fused']:.1f} | {c['dashkv_high']['median']:.2f} | {c['speedup_high']:.1f} | "
            f"{c['dashkv_step']['median']:.2f} | {c['speedup_step']:.1f} | "
            f"{c['dashkv_step_group']['median']:.2f} | {c['speedup_step_group']:.1f} | "
            f"{c['dashkv_step_union']['median']:.2f} | {c['speedup_step_union']:.1f} | {c['dashkv_floor']['median']:.2f} | "
            f"{c['speedup_floor']:.1f} | {c['dashkv_dense']['median']:.2f} | {c['speedup_dense']:.1f} | "
            f"{c['code_scan_gbps']:.1f} |"
        )
    bw = results["machine"]["read_bandwidth_gbps"]
    lines.append("\nfloor: reading the key codes and the K/V rows of the fused kernel's tiers, and nothing else; "
                 "floor × is the most these tiers can give over SDPA on this machine; dense kernel: full attention "
                 "reading K and V once per GQA group (what a layer in dense_layers runs), the step's fair rival")
    lines.append(f"read bandwidth measured in the same run: {bw:.1f} GB/s")
    for shape, by_method in results.get("slopes_16k_128k", {}).items():
        text = ", ".join(f"{name} {slope:.2f}" for name, slope in by_method.items())
        lines.append(f"log-log slope 16K-128K, {shape}: {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m dashkv.bench.attention [--device cuda] ...``: the benchmark without the CLI."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--sizes", default=None, help="comma-separated cache lengths S")
    parser.add_argument("--shapes", default="smollm2,llama3-8b")
    parser.add_argument("--batches", default="1,8", help="GPU only: comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--output", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        from dashkv.bench.attention_gpu import GPU_SIZES as default_sizes, table_gpu as show
    else:
        default_sizes, show = SIZES, table
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else default_sizes
    shapes = tuple(s.strip() for s in args.shapes.split(","))
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: {unknown} are not known; choose from {sorted(SHAPES)}")
    results = run(sizes, shapes, repeats=args.repeats or (20 if cuda else 15), output=args.output, device=args.device,
                  batches=tuple(int(b) for b in args.batches.split(",")))  # fmt: skip
    print(show(results))  # a program's output, not the library's logging


if __name__ == "__main__":
    main()
