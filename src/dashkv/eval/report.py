"""Summaries of ``dashkv eval`` results: the JSON summary, the markdown tables and the PNG plots.

Retrieval: the raw score of each (method, budget) per task, and the paired score -- of the targets
full attention reproduces, the share the method reproduces too (multi-key is noisy; pairing removes
the samples no method can get). Fidelity: next-token KL and perplexity against full attention, and the
selectors' attention-mass recall, per context length.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

ORDER = ("full", "dashkv", "oracle", "simhash", "streamingllm", "snapkv", "h2o", "kivi")
KEEP_ABOVE = 0.5  # full attention's mean score a task cell needs to count in "paired, all tasks"


def _row_key(method: str, budget: float | None) -> tuple:
    rank = ORDER.index(method) if method in ORDER else len(ORDER)
    return (method.startswith("abl:"), budget if budget is not None else -1.0, rank, method)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: list[dict]) -> dict:
    """Aggregate records into ``{"retrieval": [...rows], "fidelity": [...rows], "tasks": [...]}``."""
    retrieval = [r for r in records if r["task"] != "fidelity"]
    fidelity = [r for r in records if r["task"] == "fidelity"]
    full = {(r["task"], r["length"], r["sample"]): r["verdicts"] for r in retrieval if r["method"] == "full"}
    tasks = sorted({(r["task"], r["length"]) for r in retrieval})
    full_scores = {cell: _mean([r["score"] for r in retrieval if r["method"] == "full" and (r["task"], r["length"]) == cell])
                   for cell in tasks}  # fmt: skip
    # a cell counts towards the pooled paired score only where full attention itself scores KEEP_ABOVE
    dropped = [cell for cell, score in full_scores.items() if score is not None and score < KEEP_ABOVE]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in retrieval:
        groups[(r["method"], r["budget"])].append(r)
    rows = []
    for (method, budget), items in sorted(groups.items(), key=lambda kv: _row_key(*kv[0])):
        row = {"method": method, "budget": budget, "kept_share": _mean([r["kept_share"] for r in items]),
               "mid_share": items[0].get("mid_share"), "tasks": {}}
        pooled_hit = pooled_total = 0
        for task, length in tasks:
            mine = [r for r in items if r["task"] == task and r["length"] == length]
            hit = total = 0
            for r in mine:
                reference = full.get((task, length, r["sample"]))
                if reference is None:
                    continue
                for ref_ok, ok in zip(reference, r["verdicts"]):
                    if ref_ok:
                        total += 1
                        hit += bool(ok)
            if (task, length) not in dropped:
                pooled_hit, pooled_total = pooled_hit + hit, pooled_total + total
            row["tasks"][f"{task}@{length}"] = {"score": _mean([r["score"] for r in mine]), "n": len(mine),
                                                "paired": hit / total if total else None, "paired_n": total}
        row["paired_all"] = pooled_hit / pooled_total if pooled_total else None
        rows.append(row)
    fgroups: dict[tuple, list[dict]] = defaultdict(list)
    for r in fidelity:
        fgroups[(r["method"], r["budget"])].append(r)
    # perplexity change paired by document: each document's against full attention's on it
    full_ppl = {(r["length"], r["sample"]): r["ppl"] for r in fidelity if r["method"] == "full"}
    frows = []
    for (method, budget), items in sorted(fgroups.items(), key=lambda kv: _row_key(*kv[0])):
        row = {"method": method, "budget": budget, "lengths": {}}
        for length in sorted({r["length"] for r in items}):
            mine = [r for r in items if r["length"] == length]
            recall = [r["recall"] for r in mine if "recall" in r]
            paired = [r["ppl"] / full_ppl[length, r["sample"]] - 1 for r in mine if (length, r["sample"]) in full_ppl]
            row["lengths"][str(length)] = {
                "kl": _mean([r["kl"] for r in mine]), "ppl": _mean([r["ppl"] for r in mine]),
                "ppl_vs_full": _mean(paired), "recall": _mean(recall), "n": len(mine)}
        frows.append(row)
    return {"tasks": [f"{t}@{n}" for t, n in tasks], "dropped_cells": [f"{t}@{n}" for t, n in dropped],
            "retrieval": rows, "fidelity": frows}


def _pct(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f} %"


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "–" if value is None else format(value, fmt)


def markdown(summary: dict) -> str:
    """The retrieval and fidelity tables as markdown."""
    tasks = summary["tasks"]
    lines = []
    if tasks:  # none with --tasks none
        lines = ["### Retrieval: score (paired)", "",
                 "| method | budget | kept | mid | " + " | ".join(tasks) + " | paired, all tasks |",
                 "|---|---|---|---|" + "---|" * len(tasks) + "---|"]
    for row in summary["retrieval"]:
        cells = []
        for task in tasks:
            t = row["tasks"].get(task)
            cells.append("–" if t is None or t["score"] is None else f"{t['score']:.2f} ({_num(t['paired'])})")
        lines.append(f"| {row['method']} | {_pct(row['budget'])} | {_pct(row['kept_share'], 1)} | "
                     f"{_pct(row['mid_share'])} | " + " | ".join(cells) + f" | {_num(row['paired_all'])} |")
    if summary.get("dropped_cells"):
        lines += ["", f"Not pooled (full attention scores below {KEEP_ABOVE}): " + ", ".join(summary["dropped_cells"])]
    lengths = sorted({int(n) for row in summary["fidelity"] for n in row["lengths"]})
    if lengths:
        head = " | ".join(f"KL@{n} | ppl Δ@{n} | recall@{n}" for n in lengths)
        lines += [""] if lines else []
        lines += ["### Fidelity: next-token KL vs full, perplexity change vs full, attention-mass recall", "",
                  f"| method | budget | {head} |", "|---|---|" + "---|---|---|" * len(lengths)]
        for row in summary["fidelity"]:
            cells = []
            for n in lengths:
                f = row["lengths"].get(str(n))
                if f is None:
                    cells.append("– | – | –")
                else:
                    delta = "–" if f["ppl_vs_full"] is None else f"{100 * f['ppl_vs_full']:+.1f} %"
                    cells.append(f"{_num(f['kl'], '.4f')} | {delta} | {_num(f['recall'], '.3f')}")
            lines.append(f"| {row['method']} | {_pct(row['budget'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(summary: dict, output: Path) -> list[Path]:
    """``score_vs_budget.png`` (paired score per task vs budget, a line per method; budget-less
    methods dashed) and ``tasks_at_budget.png`` (raw score per task at each budget, bars), where
    there are retrieval results (none with ``--tasks none``) and, for the bars, budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = summary["tasks"]
    main = [r for r in summary["retrieval"] if not r["method"].startswith("abl:")]
    methods = sorted({r["method"] for r in main}, key=lambda m: _row_key(m, None))
    budgets = sorted({r["budget"] for r in main if r["budget"] is not None})
    written = []
    if not tasks:
        return written
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in methods:
            rows = [r for r in main if r["method"] == method]
            if rows[0]["budget"] is None:
                ax.axhline(rows[0]["tasks"].get(task, {}).get("score") or 0, linestyle="--", label=method,
                           color="black" if method == "full" else "grey")
                continue
            rows.sort(key=lambda r: r["budget"])
            ax.plot([100 * r["budget"] for r in rows], [r["tasks"].get(task, {}).get("score") for r in rows], marker="o",
                    label=method)  # fmt: skip
        ax.set_title(task)
        ax.set_xlabel("budget (% of context keys)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xticks([100 * b for b in budgets])
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = output / "score_vs_budget.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    if not budgets:  # full attention alone: no budget to draw bars at
        return written

    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 3.4), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for ax, budget in zip(axes[0], budgets):
        for i, method in enumerate(methods):
            row = next((r for r in main if r["method"] == method and r["budget"] in (budget, None)), None)
            if row is None:
                continue
            ax.bar([t + i * width for t in range(len(tasks))], [row["tasks"].get(t, {}).get("score") or 0 for t in tasks],
                   width, label=method)  # fmt: skip
        ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, fontsize=7)
        ax.set_title(f"budget {100 * budget:.0f} %")
        ax.set_ylim(0, 1.05)
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = output / "tasks_at_budget.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
