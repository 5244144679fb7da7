"""Decode-step attention latency on a CUDA device: SDPA (flash / efficient) against DASH-KV (Triton).

For each head shape, batch and cache length S, one decode token (T = 1), bf16: dense
``scaled_dot_product_attention`` restricted to its flash and memory-efficient backends (GQA), and
the whole DASH-KV method step as the decode path calls it (``attention.tiered_step`` on the Triton
backend: query encoding, code scan, consensus, thresholds, split-K tiered attention), tiers per query
head and per GQA group. Timed with CUDA events, interleaved, median and min-max over repeats. Beside
them: the device's copy bandwidth measured in the same run, the bytes each method must read (SDPA: all
of K and V; DASH-KV: every key code, the K rows of high keys and the V rows of high and mid keys, each
row once per KV head and chunk, as the kernel reads them) and the time that read takes at the copy
bandwidth (the floor).
"""

from __future__ import annotations

from dataclasses import asdict, replace

import torch

from dashkv.attention import always_high, layer_plan, tiered_step, visibility
from dashkv.bench.attention import SHAPES, Timing
from dashkv.config import DashKVConfig
from dashkv.encoders import LayerHashEncoder
from dashkv.ops.reference import HIGH, MID

GPU_SIZES = (8192, 16384, 32768, 65536, 131072, 524288)
GPU_BATCHES = (1, 8)
METHODS_GPU = {
    "sdpa": "SDPA (flash / efficient)",
    "dashkv_step": "DASH-KV method step, tiers per query head (Triton)",
    "dashkv_step_group": "DASH-KV method step, tiers per GQA group (Triton)",
}
GRAPHED = {f"{name}_graph": f"{label}, CUDA graph" for name, label in METHODS_GPU.items()}
"""The same calls replayed from a CUDA graph, as a serving engine runs decode: without the Python and
launch overhead of a few dozen small launches, which dominates short caches."""


def copy_bandwidth(device: torch.device, megabytes: int = 1024, repeats: int = 10) -> float:
    """GB/s of a device-to-device copy (bytes read plus bytes written over time), best of ``repeats``."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_event_time(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() / best / 1e9


def _event_time(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _time(fns: dict, repeats: int, warmup: int) -> dict[str, Timing]:
    """Warm every function up, then ``repeats`` rounds interleaving them; seconds from CUDA events."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_event_time(fn))
    return {name: Timing.of(s) for name, s in samples.items()}


def _graphed(fn):
    """``fn`` captured into a CUDA graph (after a warm-up on a side stream); None where capture fails."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as error:  # noqa: BLE001 - a benchmark row, not a failure of the run
        torch.cuda.synchronize()
        _graphed.errors.append(repr(error))
        return None


_graphed.errors = []


def _read_bytes(tiers: torch.Tensor, kv_heads: int, dim: int, code_bytes: int, elem: int) -> int:
    """Bytes the Triton step must read for these tiers: every code, and per (batch, KV head) the K rows of
    keys high for some head of the group and the V rows of keys high or mid for one (``tiers [B, H, 1,
    S]``; a group's heads share one program, so a row is read once for all of them)."""
    b, h, _, s = tiers.shape
    grouped = tiers.view(b, kv_heads, h // kv_heads, s)
    k_rows = int((grouped == HIGH).any(2).sum())
    v_rows = int(((grouped == HIGH) | (grouped == MID)).any(2).sum())
    return code_bytes + (k_rows + v_rows) * dim * elem


def bench_case_gpu(shape: str, batch: int, seq: int, config: DashKVConfig, repeats: int, warmup: int,
                   bandwidth: float, seed: int = 0) -> dict:  # fmt: skip
    """Time one (shape, batch, S) case on the current CUDA device; returns a JSON-ready dict."""
    from dashkv.ops import triton as ops

    device = torch.device("cuda")
    heads, kv_heads, dim = SHAPES[shape]
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16
    query = torch.randn(batch, heads, 1, dim, generator=gen, device=device, dtype=dtype)
    key = torch.randn(batch, kv_heads, seq, dim, generator=gen, device=device, dtype=dtype)
    value = torch.randn(batch, kv_heads, seq, dim, generator=gen, device=device, dtype=dtype)
    encoder = LayerHashEncoder(heads, kv_heads, dim, config.bits).eval().to(device)
    with torch.no_grad():
        encoder.key_proj.normal_(generator=gen)
        encoder.query_skip.copy_(encoder.key_proj.repeat_interleave(heads // kv_heads, dim=0))
    codes, norms = ops.encode_key(encoder, key)
    visible = visibility(batch, 1, seq, None, device)
    always = always_high(visible, config.sinks, config.window)
    scaling = dim**-0.5
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def dense():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)

    def method(cfg: DashKVConfig, weights: bool = False):  # the layer's plan made once, as the decode path does
        plan = layer_plan(ops, encoder, cfg, heads, kv_heads, scaling, want_prior=False, want_weights=weights)
        return lambda: tiered_step(query, key, value, codes, norms, encoder, cfg, visible, scaling, None, ops,
                                   always=always, want_weights=weights, plan=plan)  # fmt: skip

    by_share = {share: replace(config, share=share) for share in ("head", "group")}
    fns = {"sdpa": dense, "dashkv_step": method(by_share["head"]), "dashkv_step_group": method(by_share["group"])}
    for name, fn in list(fns.items()):
        replay = _graphed(fn)
        if replay is not None:
            fns[f"{name}_graph"] = replay
    timings = _time(fns, repeats, warmup)
    dense_bytes = 2 * key.numel() * key.element_size()
    code_bytes = codes.numel() * 8
    reads = {}
    for name, share in (("dashkv_step", "head"), ("dashkv_step_group", "group")):
        tiers = method(by_share[share], weights=True)().tiers
        reads[name] = _read_bytes(tiers, kv_heads, dim, code_bytes, key.element_size())
    reads["sdpa"] = dense_bytes
    reads.update({f"{name}_graph": reads[name] for name in METHODS_GPU})
    case = {"shape": shape, "batch": batch, "seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": dim,
            "dtype": "bfloat16"}  # fmt: skip
    for name, t in timings.items():
        us = {k: v * 1e3 for k, v in asdict(t).items()}  # ms -> us
        case[name] = {"median_us": us["median"], "low_us": us["low"], "high_us": us["high"],
                      "bytes_read": reads[name], "achieved_gbps": reads[name] / (t.median / 1e3) / 1e9,
                      "floor_us": reads[name] / (bandwidth * 1e9) * 1e6}  # fmt: skip
    for name in ("dashkv_step", "dashkv_step_group"):
        case[f"speedup_{name[7:]}"] = timings["sdpa"].median / timings[name].median
        if f"{name}_graph" in timings and "sdpa_graph" in timings:
            case[f"speedup_{name[7:]}_graph"] = timings["sdpa_graph"].median / timings[f"{name}_graph"].median
    return case


def _fits(shape: str, batch: int, seq: int) -> bool:
    """Whether K, V and the step's buffers (about 3x K + V) fit in half the free device memory."""
    heads, kv_heads, dim = SHAPES[shape]
    need = 2 * batch * kv_heads * seq * dim * 2 * 3 + batch * heads * seq * 16
    free, _ = torch.cuda.mem_get_info()
    return need < free / 2


def run_gpu(sizes=GPU_SIZES, shapes=("smollm2", "llama3-8b"), batches=GPU_BATCHES, repeats: int = 20,
            warmup: int = 5, bits: int = DashKVConfig.bits, progress=None, checkpoint=None) -> dict:  # fmt: skip
    """The GPU benchmark's results (the caller writes them: :func:`dashkv.bench.attention.run`);
    ``checkpoint(results so far)`` after every case, so a run cut short keeps what it measured."""
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    device = torch.device("cuda")
    config = DashKVConfig(bits=bits, high=0.05, mid=0.15, consensus=True, momentum=False)
    bandwidth = copy_bandwidth(device)
    cases = [(s, b, n) for s in shapes for b in batches for n in sizes]
    iterator = progress(cases) if progress is not None else cases
    results = []
    skipped = []
    for shape, batch, seq in iterator:
        if not _fits(shape, batch, seq):
            skipped.append({"shape": shape, "batch": batch, "seq": seq, "why": "does not fit in device memory"})
            continue
        results.append(bench_case_gpu(shape, batch, seq, config, repeats, warmup, bandwidth))
        torch.cuda.empty_cache()
        if checkpoint is not None:
            checkpoint(_summary(device, bandwidth, config, results, skipped))
    return _summary(device, bandwidth, config, results, skipped)


def _summary(device, bandwidth: float, config: DashKVConfig, results: list, skipped: list) -> dict:
    import platform

    import triton

    props = torch.cuda.get_device_properties(device)
    return {
        "machine": {"device": props.name, "memory_gib": props.total_memory / 2**30, "platform": platform.platform(),
                    "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
                    "copy_bandwidth_gbps": bandwidth},  # fmt: skip
        "config": config.to_dict(),
        "cases": results,
        "skipped": skipped,
        "graph_capture_errors": sorted(set(_graphed.errors)),
        "medians_note": "microseconds per decode step (one token), CUDA events",
    }


def plot_gpu(results: dict, path) -> None:
    """Log-log µs against S, one panel per (shape, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(c["shape"], c["batch"]) for c in results["cases"]})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4.5), squeeze=False)
    for ax, (shape, batch) in zip(axes[0], panels):
        cases = [c for c in results["cases"] if c["shape"] == shape and c["batch"] == batch]
        seqs = [c["seq"] for c in cases]
        for name, label in {**METHODS_GPU, **GRAPHED}.items():
            if all(name in c for c in cases):
                ax.loglog(seqs, [c[name]["median_us"] for c in cases], marker="o", label=label,
                          ls=":" if name.endswith("_graph") else "-")  # fmt: skip
        ax.loglog(seqs, [c["dashkv_step_group"]["floor_us"] for c in cases], ls="--", label="group step: read floor")
        ax.set_title(f"{shape}, batch {batch}, bf16, {results['machine']['device']}", fontsize=9)
        ax.set_xlabel("keys in cache (S)")
        ax.set_ylabel("µs per step (median)")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table_gpu(results: dict) -> str:
    """Markdown table: medians in µs, speed-ups over SDPA in the same run, achieved GB/s."""
    lines = ["| shape | B | S | SDPA µs | SDPA GB/s | head step µs | head × | group step µs | group × | "
             "group GB/s | group floor µs | graphed: SDPA µs | head µs | head × | group µs | group × |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def us(c, name):
        return f"{c[name]['median_us']:.0f}" if name in c else "-"

    def times(c, name):
        return f"{c[name]:.2f}" if name in c else "-"

    for c in results["cases"]:
        s, g = c["sdpa"], c["dashkv_step_group"]
        lines.append(
            f"| {c['shape']} | {c['batch']} | {c['seq']} | {s['median_us']:.0f} | {s['achieved_gbps']:.0f} | "
            f"{us(c, 'dashkv_step')} | {times(c, 'speedup_step')} | {g['median_us']:.0f} | "
            f"{times(c, 'speedup_step_group')} | {g['achieved_gbps']:.0f} | {g['floor_us']:.0f} | "
            f"{us(c, 'sdpa_graph')} | {us(c, 'dashkv_step_graph')} | {times(c, 'speedup_step_graph')} | "
            f"{us(c, 'dashkv_step_group_graph')} | {times(c, 'speedup_step_group_graph')} |"
        )
    m = results["machine"]
    lines.append(f"\n{m['device']}; copy bandwidth measured in the same run: {m['copy_bandwidth_gbps']:.0f} GB/s")
    for skip in results.get("skipped", []):
        lines.append(f"skipped {skip['shape']} B{skip['batch']} S{skip['seq']}: {skip['why']}")
    return "\n".join(lines)
