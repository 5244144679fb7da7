"""The ``dashkv eval`` command: run a suite over methods and budgets, resumable, and write
``results.jsonl`` (the cache), ``results.json`` (summary), ``results.md`` (tables) and PNG plots."""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer

from dashkv.config import DashKVConfig


def _encoders(model, path: Optional[Path], bits: int):
    from dashkv import HashEncoders
    from dashkv.shipped import shipped_encoders

    if path is not None:
        return HashEncoders.from_pretrained(path), f"trained ({path})"
    try:
        return shipped_encoders(model), "trained (shipped)"
    except ValueError:
        return HashEncoders.random(model, bits=bits, seed=0), f"RANDOM projection, {bits} bits (no trained encoders found)"


def eval_command(
    suite: str = typer.Option("quick", help="quick (default model: pass key + multi-key at 2K, fidelity at 2K/4K/8K) "
                                            "or full; gemma-3-270m: 2K-16K, fidelity 8K-32K (dashkv.eval.suite)."),
    methods: str = typer.Option("full,dashkv,oracle,simhash,streamingllm,snapkv,h2o,kivi,ablation",
                                help="Comma-separated methods."),
    budgets: str = typer.Option("0.02,0.05,0.10", help="Comma-separated budgets (share of context keys)."),
    model: Optional[str] = typer.Option(None, help="HF directory or hub id; default: embedded SmolLM2-135M."),
    encoders: Optional[Path] = typer.Option(None, help="DASH-KV encoders directory (default: shipped, else random)."),
    bits: int = typer.Option(DashKVConfig.bits, help="Bits of random encoders when no trained ones exist."),
    output: Path = typer.Option(Path("runs/eval"), help="Output folder (results are cached and resumed here)."),
    tasks: Optional[str] = typer.Option(None, help="Only these retrieval tasks (comma-separated); 'none' for fidelity only."),
    fidelity: bool = typer.Option(True, help="Run the fidelity part (KL, perplexity, recall)."),
    samples: Optional[int] = typer.Option(None, help="At most this many samples per task (a smaller, noisier run)."),
    threads: int = typer.Option(2, help="torch threads."),
) -> None:
    """Evaluate DASH-KV and the baselines on long-context tasks at several budgets."""
    import dataclasses

    import torch
    from tqdm import tqdm

    import dashkv
    from dashkv.baselines import build_methods
    from dashkv.eval import report
    from dashkv.eval.fidelity import run_fidelity
    from dashkv.eval.store import ResultStore
    from dashkv.eval.suite import run_retrieval, suite_for

    try:
        spec = suite_for(suite, model)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    if tasks is not None:
        chosen = [] if tasks == "none" else [t.strip() for t in tasks.split(",")]
        from dashkv.eval.tasks import TASKS

        unknown = [t for t in chosen if t not in TASKS]
        if unknown:
            raise typer.BadParameter(f"tasks {unknown} are not known; choose from {sorted(TASKS)}")
        spec = dataclasses.replace(spec, tasks={t: spec.tasks.get(t, ((2048, 10),)) for t in chosen})
    if not fidelity:
        spec = dataclasses.replace(spec, fidelity_lengths=())
    if samples is not None:
        if samples < 1:
            raise typer.BadParameter(f"samples={samples}; must be >= 1")
        spec = dataclasses.replace(spec, tasks={t: tuple((n, min(c, samples)) for n, c in cells)
                                                for t, cells in spec.tasks.items()})  # fmt: skip
    torch.set_num_threads(threads)
    start, cpu = time.perf_counter(), time.process_time()
    lm, tok = dashkv.load_model(model)
    enc, source = _encoders(lm, encoders, bits)
    typer.echo(f"encoders: {source}")
    try:
        shares = tuple(float(b) for b in budgets.split(","))
        rows = build_methods(lm, enc, tuple(m.strip() for m in methods.split(",")), shares,
                             trained=not source.startswith("RANDOM"))
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    store = ResultStore(output / "results.jsonl")
    typer.echo(f"{len(rows)} method rows; {len(store.records)} results cached in {store.path}")
    run_retrieval(lm, tok, spec, rows, store, progress=lambda xs: tqdm(xs, desc="retrieval samples"))
    fidelity_rows = [r for r in rows if not r.name.startswith("abl:")
                     and (spec.fidelity_budgets is None or r.budget is None or r.budget in spec.fidelity_budgets)]
    run_fidelity(lm, tok, spec, fidelity_rows, store, progress=lambda xs: tqdm(xs, desc="fidelity documents"))
    summary = report.summarize(store.all())
    summary["run"] = {
        "suite": suite, "encoders": source, "methods": methods, "budgets": budgets,
        "model": model or "SmolLM2-135M-Instruct (embedded)", "tasks_kept": spec.tasks,
        "tasks_dropped": spec.dropped, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "seconds_this_invocation": time.perf_counter() - start,
        "cpu_seconds_this_invocation": time.process_time() - cpu,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = report.markdown(summary)
    (output / "results.md").write_text(table)
    pngs = report.plots(summary, output)
    typer.echo(table)
    typer.echo(f"{(time.perf_counter() - start) / 60:.1f} min wall, {(time.process_time() - cpu) / 60:.1f} min CPU; wrote {output / 'results.json'}, "
               f"{output / 'results.md'}, " + ", ".join(str(p) for p in pngs))
