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
@pytest.mark.parametrize("verbose", [False, True])
def test_demo_answers_both_ways_from_one_prefill(default_model, verbose):
    result = runner.invoke(app, ["demo", "--length", "1000", "--dense-below", "0"] + (["--verbose"] if verbose else []))
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("shared dense prefill:") == 1
    assert "full attention:" in out and "DASH-KV:" in out and out.count("ms/token") == 2
    assert "x as fast as full attention" in out
    assert "DASH-KV tiers over the question and answer tokens: high" in out  # the one summary line
    assert ("layer    high" in out) == verbose  # the per-layer table only with --verbose


@pytest.mark.slow
def test_demo_below_dense_below_says_why_no_tiers_ran(default_model):
    result = runner.invoke(app, ["demo", "--length", "1000"])
    assert result.exit_code == 0, result.output
    assert "DASH-KV tiers: none ran: below dense_below=6144 keys" in result.output
    assert "--dense-below 0" in result.output


def _no_model_load(monkeypatch):
    import dashkv

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(dashkv, "load_model", fail)


@pytest.mark.parametrize("args", [["--length", "50"], ["--new-tokens", "1"], ["--dense-below", "-1"]])
def test_demo_rejects_bad_options_before_loading_the_model(monkeypatch, args):
    _no_model_load(monkeypatch)
    result = runner.invoke(app, ["demo"] + args)
    assert result.exit_code == 2 and args[0] in result.output, result.output


@pytest.mark.parametrize(
    "args, word",
    [
        (["--lengths", "2048,4x"], "--lengths"),
        (["--lengths", "2048,0"], "--lengths"),
        (["--new-tokens", "1"], "--new-tokens"),
        (["--busy", "-1"], "--busy"),
        (["--busy", "1000"], "--busy"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bench_generate_rejects_bad_options_before_loading_the_model(monkeypatch, args, word):
    _no_model_load(monkeypatch)
    result = runner.invoke(app, ["bench", "generate"] + args)
    assert result.exit_code == 2 and word in result.output, result.output


def test_bench_generate_writes_every_row_and_the_load(tmp_path, word_level_model):
    import json

    import numba

    threads = (torch.get_num_threads(), numba.get_num_threads())
    args = ["bench", "generate", "--model", str(word_level_model), "--output", str(tmp_path / "bench"),
            "--lengths", "100,300", "--new-tokens", "3", "--threads", "1", "--busy", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "SnapKV" in result.output and "1 CPU-bound competitor processes" in result.output
    results = json.loads((tmp_path / "bench" / "generate.json").read_text())
    assert results["busy"]["processes"] == 1 and len(results["busy"]["cpu_seconds"]) == 1
    assert results["encoders"].startswith("random projection")
    assert [c["length"] for c in results["cases"]] == [100, 300]
    assert all(list(c["runs"]) == list(results["rows"]) for c in results["cases"])
    assert (torch.get_num_threads(), numba.get_num_threads()) == threads  # --threads only while it ran


def test_warmup_command_compiles_or_loads_the_kernels():
    result = runner.invoke(app, ["warmup"])
    assert result.exit_code == 0, result.output
    assert "DASH-KV CPU kernels" in result.output and " s" in result.output


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


@pytest.fixture(scope="module")
def word_level_model(tmp_path_factory):
    """The directory of :func:`_word_level_llama` (built once: it takes a while)."""
    directory = tmp_path_factory.mktemp("word_level") / "model"
    _word_level_llama(directory)
    return directory


def test_train_writes_encoders_and_held_out_metrics(tmp_path, device, word_level_model):
    import json

    from dashkv import HashEncoders, load_model

    out = tmp_path / "encoders"
    args = ["train", "--model", str(word_level_model), "--output", str(out), "--steps", "20", "--sequences", "4",
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
    model, _ = load_model(word_level_model)
    loaded = HashEncoders.from_pretrained(out)
    loaded.check_compatible(model)
    check = metrics["layer_check"]  # each trained layer measured alone; those over the limit left dense
    assert check["length"] == 1024 and sorted(k for k in check["layers"] if k != "full") == ["1", "2"]
    assert all(row["kl"] >= 0 for key, row in check["layers"].items() if key != "full")
    over = [int(k) for k, row in check["layers"].items() if k != "full" and row["kl"] > check["max_kl"]]
    assert list(loaded.dense_layers) == check["dense_layers"] == over
    # measured at 0.4x and 1.6x the high share too; the scales chosen are saved, in pairs that keep the mean
    assert all(set(row["kl_at"]) == {"0.4", "1.6"} for key, row in check["layers"].items() if key != "full")
    assert {str(k): v for k, v in loaded.budget_scales.items()} == check["budget_scales"]
    assert sum(loaded.budget_scales.values()) == pytest.approx(len(loaded.budget_scales))


@pytest.mark.parametrize("name", ["tpu", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_train_refuses_a_device_that_is_not_there(name):
    result = runner.invoke(app, ["train", "--device", name])
    assert result.exit_code != 0 and "--device" in result.output and "auto" in result.output


_WITHOUT_GPU = [] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda")]


@pytest.mark.parametrize("args, word", [(["--device", "tpu"], "--device"), (["--batches", "0"], "--batches")] + _WITHOUT_GPU)
def test_bench_attention_rejects_bad_device_options_in_one_line(args, word):
    result = runner.invoke(app, ["bench", "attention", "--sizes", "64", "--shapes", "smollm2"] + args)
    assert result.exit_code == 2 and word in result.output and "Traceback" not in result.output


def test_bench_generate_dense_below_is_checked_by_the_config(monkeypatch):
    _no_model_load(monkeypatch)
    result = runner.invoke(app, ["bench", "generate", "--dense-below", "-1"])
    assert result.exit_code == 2 and "--dense-below" in result.output, result.output


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_train_refuses_a_layer_check_limit_that_is_not_a_kl(value, tmp_path):
    result = runner.invoke(app, ["train", "--max-layer-kl", value, "--output", str(tmp_path / "enc")])
    assert result.exit_code != 0 and "--max-layer-kl" in result.output and "Traceback" not in result.output
