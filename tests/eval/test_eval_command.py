import json

import pytest
from typer.testing import CliRunner

from dashkv.cli import app


def test_eval_rejects_unknown_suite_method_and_task():
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--suite", "huge"])
    assert result.exit_code != 0 and "huge" in result.output
    result = runner.invoke(app, ["eval", "--tasks", "haystack"])
    assert result.exit_code != 0 and "haystack" in result.output


@pytest.mark.slow
def test_eval_quick_runs_resumes_and_writes_outputs(tmp_path):
    runner = CliRunner()
    args = ["eval", "--suite", "quick", "--tasks", "passkey", "--samples", "1", "--no-fidelity",
            "--methods", "full,dashkv,snapkv,kivi", "--budgets", "0.1", "--output", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4
    summary = json.loads((tmp_path / "results.json").read_text())
    full = next(r for r in summary["retrieval"] if r["method"] == "full")
    assert full["tasks"]["passkey@2048"]["score"] == 1.0
    assert (tmp_path / "score_vs_budget.png").stat().st_size > 0 and (tmp_path / "results.md").is_file()
    again = runner.invoke(app, args)  # everything cached: nothing is measured again
    assert again.exit_code == 0 and "4 results cached" in again.output
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
