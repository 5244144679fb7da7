import json

import pytest
import torch

from dashkv.eval import report
from dashkv.eval.protocol import Block, make_block, score_block
from dashkv.eval.store import ResultStore
from dashkv.eval.tasks import TASKS
from dashkv.eval.tasks.sample import TaskSample


class _DigitTokenizer:
    """One token per character: enough to check target spans and the digit rule."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        class Enc:
            pass

        enc = Enc()
        enc.input_ids = [ord(c) for c in text]
        enc.offset_mapping = [(i, i + 1) for i in range(len(text))]
        return enc

    def decode(self, ids):
        return "".join(chr(int(i)) for i in ids)


def test_make_block_locates_targets_and_scores_them():
    tok = _DigitTokenizer()
    sample = TaskSample("t", 0, "ctx", "Q? ", "12, 345.", ("12", "345"))
    block = make_block(tok, sample)
    assert block.answer_start == 3 and block.targets == [(3, 4), (7, 9)]
    gold = block.ids[0]
    # predictions: entry i predicts block token answer_start + i; the last one the token after the answer
    perfect = torch.cat([gold[3:], torch.tensor([ord("\n")])])
    assert score_block(perfect, block, tok) == (1.0, [True, True])
    wrong_digit = perfect.clone()
    wrong_digit[5] = ord("9")  # "345" -> "395"
    assert score_block(wrong_digit, block, tok) == (0.5, [True, False])
    longer = perfect.clone()
    longer[2] = ord("7")  # "12" followed by a digit instead of ","
    assert score_block(longer, block, tok)[1] == [False, True]


def _record(task, sample, method, budget, verdicts, **extra):
    return {"task": task, "length": 2048, "sample": sample, "method": method, "budget": budget,
            "score": sum(verdicts) / len(verdicts), "verdicts": verdicts, "kept_share": 0.1, **extra}


def test_summary_paired_score_counts_only_what_full_attention_gets():
    records = [
        _record("multikey", 0, "full", None, [True]),
        _record("multikey", 1, "full", None, [False]),
        _record("multikey", 2, "full", None, [True]),
        _record("multikey", 0, "dashkv", 0.05, [True], mid_share=0.15),
        _record("multikey", 1, "dashkv", 0.05, [True], mid_share=0.15),  # full misses it: not in the pair
        _record("multikey", 2, "dashkv", 0.05, [False], mid_share=0.15),
        _record("multivalue", 0, "full", None, [True, True, False, False]),
        _record("multivalue", 0, "dashkv", 0.05, [True, False, True, False], mid_share=0.15),
    ]
    summary = report.summarize(records)
    dash = next(r for r in summary["retrieval"] if r["method"] == "dashkv")
    assert dash["tasks"]["multikey@2048"]["score"] == pytest.approx(2 / 3)
    assert dash["tasks"]["multikey@2048"]["paired"] == pytest.approx(1 / 2)
    assert dash["tasks"]["multivalue@2048"]["paired"] == pytest.approx(1 / 2)
    assert dash["paired_all"] == pytest.approx(2 / 4)
    table = report.markdown(summary)
    assert "| dashkv | 5 % |" in table and "0.67 (0.50)" in table


def test_cells_full_attention_fails_are_shown_but_not_pooled():
    at = lambda length, *args, **extra: _record(*args, **extra) | {"length": length}  # noqa: E731
    records = [
        at(2048, "passkey", 0, "full", None, [True]), at(2048, "passkey", 1, "full", None, [True]),
        at(16384, "passkey", 0, "full", None, [True]), at(16384, "passkey", 1, "full", None, [False]),
        at(16384, "passkey", 2, "full", None, [False]),  # full attention 1 of 3: this cell is dropped
        at(2048, "passkey", 0, "dashkv", 0.05, [True]), at(2048, "passkey", 1, "dashkv", 0.05, [False]),
        at(16384, "passkey", 0, "dashkv", 0.05, [True]), at(16384, "passkey", 1, "dashkv", 0.05, [False]),
        at(16384, "passkey", 2, "dashkv", 0.05, [False]),
    ]
    summary = report.summarize(records)
    dash = next(r for r in summary["retrieval"] if r["method"] == "dashkv")
    assert summary["tasks"] == ["passkey@2048", "passkey@16384"] and summary["dropped_cells"] == ["passkey@16384"]
    assert dash["tasks"]["passkey@16384"]["paired"] == 1.0  # still reported per cell
    assert dash["paired_all"] == 0.5  # from the 2K cell alone
    assert "Not pooled (full attention scores below 0.5): passkey@16384" in report.markdown(summary)


def test_perplexity_change_is_paired_by_document():
    def fid(method, budget, doc, ppl):
        return {"task": "fidelity", "length": 8192, "sample": doc, "method": method, "budget": budget, "kl": 0.0,
                "ppl": ppl}  # fmt: skip

    # two documents whose perplexities differ twofold: each method's change is against full on that document
    records = [fid("full", None, 0, 10.0), fid("full", None, 1, 20.0), fid("dashkv", 0.05, 0, 11.0),
               fid("dashkv", 0.05, 1, 20.0)]  # fmt: skip
    rows = {r["method"]: r["lengths"]["8192"] for r in report.summarize(records)["fidelity"]}
    assert rows["full"]["ppl_vs_full"] == 0.0
    assert rows["dashkv"]["ppl_vs_full"] == pytest.approx(0.05)  # +10 % and +0 %
    assert rows["dashkv"]["ppl"] == pytest.approx(15.5)


def test_plots_draw_every_method_and_none_without_retrieval(tmp_path, monkeypatch):
    """``--tasks none`` (fidelity alone) writes no retrieval plot or table instead of failing at the end of
    the run, and methods outside the report's usual order (the sharing modes) are drawn too."""
    fidelity = [{"task": "fidelity", "length": 2048, "sample": 0, "method": m, "budget": b, "kl": 0.0, "ppl": 1.0}
                for m, b in (("full", None), ("dashkv-group", 0.05))]  # fmt: skip
    assert report.plots(report.summarize(fidelity), tmp_path) == []
    assert report.markdown(report.summarize(fidelity)).startswith("### Fidelity")  # no empty retrieval table
    drawn = []
    import matplotlib.axes

    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: drawn.append(k["label"]) or plot(ax, *a, **k))
    records = [_record("multikey", 0, "full", None, [True])] + [
        _record("multikey", 0, m, b, [True], mid_share=0.15)
        for m in ("dashkv-head", "dashkv-group") for b in (0.02, 0.05)
    ]  # fmt: skip
    written = report.plots(report.summarize(records), tmp_path)
    assert [p.name for p in written] == ["score_vs_budget.png", "tasks_at_budget.png"]
    assert drawn == ["dashkv-group", "dashkv-head"]


def test_store_resumes_and_skips_a_torn_line(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    store.add(_record("passkey", 0, "full", None, [True]))
    store.add(_record("passkey", 0, "snapkv", 0.02, [False]))
    with (tmp_path / "r.jsonl").open("a") as handle:
        handle.write('{"task": "passkey", "len')  # interrupted mid-write
    again = ResultStore(tmp_path / "r.jsonl")
    assert again.has("passkey", 2048, 0, "snapkv", 0.02) and again.has("passkey", 2048, 0, "full", None)
    assert not again.has("passkey", 2048, 1, "full", None)
    assert len(again.all()) == 2


def test_needle_tasks_format_and_determinism(default_model):
    _, tok = default_model
    for name in ("multikey", "multivalue", "multiquery", "passkey", "variable_tracking"):
        a, b = TASKS[name](tok, 1000, 5), TASKS[name](tok, 1000, 5)
        assert a == b and a != TASKS[name](tok, 1000, 6)
        assert a.question.endswith(" ") and a.question.startswith("\n\n")
        assert 700 < len(tok(a.context).input_ids) <= 1000
        for target in a.targets:
            assert target in a.answer and target in a.context
    mk = TASKS["multikey"](tok, 1000, 5)
    assert mk.context.count("One of the special magic numbers for") == 4
    assert f"\n\nOne of the special magic numbers for {mk.meta['asked']} is: {mk.targets[0]}.\n\n" in mk.context
