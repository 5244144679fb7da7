import pytest
from typer.testing import CliRunner

from dashkv.cli import app

runner = CliRunner()


@pytest.mark.parametrize("method", ["full", "dashkv"])
def test_generate_runs_on_default_model(method, default_model):
    result = runner.invoke(app, ["generate", "The capital of France is", "--method", method, "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert f"[{method}]" in result.output


def test_generate_rejects_empty_and_double_prompts(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "empty" in runner.invoke(app, ["generate", "--file", str(empty)]).output
    assert "not both" in runner.invoke(app, ["generate", "hi", "--file", str(empty)]).output


@pytest.mark.slow
def test_demo_prints_both_answers_and_tiers(default_model):
    result = runner.invoke(app, ["demo", "--length", "1000"])
    assert result.exit_code == 0, result.output
    assert "full attention:" in result.output and "DASH-KV:" in result.output and "high" in result.output
