import re

import pytest
import torch
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


def _word_level_llama(directory):
    """A tiny random Llama with a word-level tokenizer of the built-in corpus, saved like a hub model:
    ``dashkv train`` runs end to end on it in seconds, and it needs no download and no default model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from dashkv import corpus

    # the Whitespace pre-tokenizer's own pattern (its pre_tokenize_str takes 12 s over the corpus)
    words = sorted({w for part in ("train", "eval") for w in re.findall(r"\w+|[^\w\s]+", corpus.text(part))})
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0} | {w: i + 1 for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words) + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    LlamaForCausalLM(config).save_pretrained(directory)


def test_train_writes_encoders_and_held_out_metrics(tmp_path, device):
    import json

    from dashkv import HashEncoders, load_model

    _word_level_llama(tmp_path / "model")
    out = tmp_path / "encoders"
    args = ["train", "--model", str(tmp_path / "model"), "--output", str(out), "--steps", "20", "--sequences", "4",
            "--seq-len", "1024", "--long-sequences", "0", "--device", str(device)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"on {device}" in result.output and "gap closed at 5 %" in result.output
    assert not (out / "checkpoint").exists()  # finished: nothing left to resume
    metrics = json.loads((out / "metrics.json").read_text())
    for length in ("2048", "8192"):
        mean = metrics["held_out"][length]["mean"]
        assert mean["oracle_high@5%"] >= mean["random_high@5%"] > 0
        assert mean["next_token_kl_trained"] >= 0 and mean["output_error_trained"] > 0
    model, _ = load_model(tmp_path / "model")
    HashEncoders.from_pretrained(out).check_compatible(model)


@pytest.mark.parametrize("name", ["tpu", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_train_refuses_a_device_that_is_not_there(name):
    result = runner.invoke(app, ["train", "--device", name])
    assert result.exit_code != 0 and "--device" in result.output and "auto" in result.output
