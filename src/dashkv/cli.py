"""The ``dashkv`` command: generate with full attention or DASH-KV, and the pass-key demo."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from dashkv.config import DashKVConfig

app = typer.Typer(help="DASH-KV: long-context attention through learned binary hashing.", no_args_is_help=True)


class Method(str, Enum):
    full = "full"
    dashkv = "dashkv"


def _user_error(message: str) -> None:
    """A user mistake: one line on stderr and exit status 2 (click's status for bad usage), no traceback."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(2)


def _option_error(error: ValueError, renames: dict[str, str] | None = None) -> None:
    """A config's :class:`ConfigError` as the option that set the field (``high`` -> ``--high``)."""
    field = getattr(error, "field", None)
    if field is None:
        _user_error(str(error))
    option = (renames or {}).get(field, "--" + field.replace("_", "-"))
    _user_error(f"{option}: {error}")


def _check_config(**settings) -> DashKVConfig:
    """The DashKVConfig of the options (its own checks), or a one-line error naming the option."""
    try:
        return DashKVConfig(**settings)
    except ValueError as error:
        _option_error(error)


def _positive(option: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        _user_error(f"{option} {value} is not allowed; {option} must be an integer >= {minimum}")


def _positive_ints(option: str, text: str, what: str, example: str) -> tuple[int, ...]:
    """``text`` as comma-separated integers >= 1, else a one-line error naming ``option``."""
    try:
        values = tuple(int(s) for s in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        _user_error(f"{option} {text!r} is not allowed; give comma-separated {what} >= 1, e.g. {example}")
    return values


def _read_prompt(prompt: Optional[str], file: Optional[Path]) -> str:
    if (prompt is None) == (file is None):
        _user_error("give either a PROMPT argument or --file, not both (nor neither)")
    if file is not None:
        if not file.is_file():
            _user_error(f"--file {file}: no such file")
        try:
            text = file.read_text()
        except (OSError, UnicodeDecodeError) as error:
            _user_error(f"--file {file}: cannot read it as text ({error})")
    else:
        text = prompt
    if not text.strip():
        _user_error("--file: the prompt is empty" if file is not None else "PROMPT: the prompt is empty")
    return text


def _check_model_option(model: Optional[str]) -> None:
    """A local ``--model`` must be a Hugging Face model directory (hub ids are tried when loading)."""
    if model is None:
        return
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            _user_error(f"--model {model}: not a Hugging Face model directory (it has no config.json)")
    elif path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        _user_error(f"--model {model}: no such directory (give a model directory or a hub id such as org/name)")


def _load_model(model: Optional[str]):
    """``dashkv.load_model`` with the user's mistakes as one line naming ``--model``."""
    import dashkv

    _check_model_option(model)
    try:
        return dashkv.load_model(model)
    except (OSError, ValueError) as error:  # a hub id that cannot be fetched, an unsupported model type
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        _user_error(f"--model {model or '(default)'}: cannot load it: {first}")


def _load_encoders(path: Optional[Path]):
    """The encoders of ``--encoders`` (before any model loads), or None."""
    if path is None:
        return None
    from dashkv import HashEncoders

    try:
        return HashEncoders.from_pretrained(path)
    except (OSError, ValueError) as error:
        _user_error(f"--encoders {path}: {error}")


def _encoders(model, given, path: Optional[Path], bits: Optional[int], seed: int):
    """The encoders to run (``--encoders``, else shipped, else random) and where they came from; ``--bits``
    only chooses the random ones' length, so another length with given or shipped encoders is refused."""
    from dashkv import HashEncoders
    from dashkv.shipped import shipped_encoders

    if given is not None:
        encoders, source = given, str(path)
    else:
        try:
            encoders, source = shipped_encoders(model), "shipped"
        except ValueError:
            bits = bits if bits is not None else DashKVConfig.bits
            return HashEncoders.random(model, bits=bits, seed=seed), f"random projection ({bits} bits, seed {seed})"
    if bits is not None and bits != encoders.bits:
        _user_error(f"--bits {bits} cannot apply: the {source} encoders are {encoders.bits}-bit (--bits only sets "
                    "the length of random encoders, used when none are given or shipped); drop --bits")  # fmt: skip
    return encoders, source


def _config(encoders, high: float, mid: float, sinks: int, window: int, **settings):
    return _check_config(bits=encoders.bits, high=high, mid=mid, sinks=sinks, window=window, **settings)


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="Prompt text (or use --file)."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the prompt from this file."),
    method: Method = typer.Option(Method.dashkv, help="full attention or DASH-KV."),
    model: Optional[str] = typer.Option(None, help="HF directory or hub id; default: embedded SmolLM2-135M."),
    encoders: Optional[Path] = typer.Option(None, help="Encoders directory (default: shipped, else random)."),
    bits: Optional[int] = typer.Option(
        None, help=f"Bits of random encoders, used when none are given or shipped (default {DashKVConfig.bits})."
    ),
    high: float = typer.Option(0.05, help="Share of context keys attended exactly."),
    mid: float = typer.Option(0.15, help="Share of context keys estimated from codes."),
    sinks: int = typer.Option(4),
    window: int = typer.Option(64),
    max_new_tokens: int = typer.Option(64),
    seed: int = typer.Option(0, help="Seed of random encoders."),
) -> None:
    """Generate a continuation of a prompt."""
    import time

    import torch

    import dashkv

    text = _read_prompt(prompt, file)  # every option checked before the model loads
    _positive("--max-new-tokens", max_new_tokens)
    given = None
    if method is Method.dashkv:
        _check_config(bits=bits if bits is not None else DashKVConfig.bits, high=high, mid=mid, sinks=sinks,
                      window=window)  # fmt: skip
        given = _load_encoders(encoders)
    lm, tok = _load_model(model)
    ids = tok(text, return_tensors="pt").input_ids
    limit = getattr(lm.config, "max_position_embeddings", None)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        _user_error(f"--max-new-tokens {max_new_tokens}: the prompt's {ids.shape[1]} tokens + {max_new_tokens} new "
                    f"exceed the model's {limit} positions")  # fmt: skip
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(ids))
    start = time.perf_counter()
    if method is Method.full:
        out = lm.generate(ids, **kwargs)
        stats = None
    else:
        enc, source = _encoders(lm, given, encoders, bits, seed)
        try:
            enc.check_compatible(lm)
        except ValueError as error:
            _user_error(f"--encoders {encoders}: {error}")
        typer.echo(f"encoders: {source}")
        with dashkv.enable(lm, enc, _config(enc, high, mid, sinks, window)) as stats:
            out = lm.generate(ids, **kwargs)
    typer.echo(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    typer.echo(f"\n[{method.value}] {ids.shape[1]} prompt tokens, {time.perf_counter() - start:.1f} s")
    if stats is not None:
        typer.echo(stats.table())


_DEMO_MIN_LENGTH = 200  # tokens: the needle, its blank lines and some text around it


@app.command()
def demo(
    length: int = typer.Option(7500, help="Context length in tokens."),
    seed: int = typer.Option(0, help="Seed of the haystack, needle position and pass key."),
    encoders: Optional[Path] = typer.Option(None, help="Encoders directory (default: shipped, else random)."),
    bits: Optional[int] = typer.Option(
        None, help=f"Bits of random encoders, used when none are given or shipped (default {DashKVConfig.bits})."
    ),
    high: float = typer.Option(0.05),
    mid: float = typer.Option(0.15),
    sinks: int = typer.Option(4),
    window: int = typer.Option(64),
    new_tokens: int = typer.Option(16, help="Answer tokens each method decodes."),
    dense_below: Optional[int] = typer.Option(
        None, help=f"Attend exactly below this many keys (default {DashKVConfig.dense_below}; 0: tiers everywhere)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print the per-layer tier table."),
) -> None:
    """Hide a pass key in real text, prefill it once, and answer from it with full attention and DASH-KV."""
    import time

    from dashkv.eval.runner import answer_from_cache, dynamic_copy, prefill_context
    from dashkv.eval.tasks import passkey

    if length < _DEMO_MIN_LENGTH:
        _user_error(f"--length {length}: at least {_DEMO_MIN_LENGTH} tokens (the needle and some text)")
    if new_tokens < 2:
        _user_error(f"--new-tokens {new_tokens}: at least 2")
    below = {} if dense_below is None else {"dense_below": dense_below}
    _check_config(bits=bits if bits is not None else DashKVConfig.bits, high=high, mid=mid, sinks=sinks, window=window,
                  **below)  # fmt: skip
    given = _load_encoders(encoders)
    start = time.perf_counter()
    lm, tok = _load_model(None)
    typer.echo(f"model: SmolLM2-135M-Instruct, loaded in {time.perf_counter() - start:.1f} s")
    enc, source = _encoders(lm, given, encoders, bits, seed)
    cfg = _config(enc, high, mid, sinks, window, **below)
    sample = passkey.make_sample(tok, length, seed)
    ids = tok(sample.context, return_tensors="pt").input_ids
    limit = getattr(lm.config, "max_position_embeddings", None)
    question = len(tok(sample.question, add_special_tokens=False).input_ids)
    if limit is not None and ids.shape[1] + question + new_tokens > limit:
        _user_error(f"--length {length}: {ids.shape[1]} context tokens + the question + "
                                 f"{new_tokens} new exceed the model's {limit} positions")  # fmt: skip
    typer.echo(f"encoders: {source}; high={high:.0%} mid={mid:.0%} sinks={sinks} window={window}")
    typer.echo(f"pass key {sample.answer} hidden at depth {sample.depth:.0%} of {ids.shape[1]} tokens of real text")
    cache, seconds = prefill_context(lm, ids, enc, cfg)
    typer.echo(f"shared dense prefill: {ids.shape[1]} tokens in {seconds:.1f} s (both methods answer from its "
               "K/V; DASH-KV codes the keys in its first step)\n")  # fmt: skip
    full = answer_from_cache(lm, tok, dynamic_copy(cache), sample.question, new_tokens)
    import dashkv

    with dashkv.enable(lm, enc, cfg) as stats:
        hashed = answer_from_cache(lm, tok, cache, sample.question, new_tokens)
    for name, answer in (("full attention", full), ("DASH-KV", hashed)):
        verdict = "correct" if passkey.score(answer.text, sample.answer) else "wrong"
        typer.echo(f"{name:>15}: {answer.text.strip()!r:40} {verdict:8} {answer.ms_per_token:6.1f} ms/token")
    typer.echo(f"\nDASH-KV decodes {full.ms_per_token / hashed.ms_per_token:.2f}x as fast as full attention "
               f"(median of {len(full.step_s)} decode steps each; the question block, which gives the first token, apart)")
    typer.echo(_tier_line(stats, cfg, ids.shape[1]))
    if verbose:
        typer.echo(stats.table())


def _tier_line(stats, config: DashKVConfig, context: int) -> str:
    """One line: mean tier shares over the tiered layers, or why there are none."""
    summary = stats.summary()
    if "mean" not in summary:
        if context < config.dense_below:
            return (f"\nDASH-KV tiers: none ran: below dense_below={config.dense_below} keys a layer attends "
                    "exactly (on a CPU through dashkv's dense kernel); --dense-below 0 runs the tiers at every length")
        return "\nDASH-KV tiers: no tiered attention ran"
    mean, layers = summary["mean"], len(summary) - 1
    return (f"\nDASH-KV tiers over the question and answer tokens: high {mean['high']:.1%}, mid {mean['mid']:.1%}, "
            f"low {mean['low']:.1%} (mean of {layers} tiered layers, sinks and window included; --verbose: per layer)")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        _user_error(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        _user_error(f"--device {name!r}: no CUDA device is available here; use cpu or auto")
    return device


@app.command()
def train(
    output: Path = typer.Option(Path("runs/encoders"), help="Where the encoders, checkpoint and metrics.json go."),
    model: Optional[str] = typer.Option(None, help="HF directory or hub id; default: embedded SmolLM2-135M."),
    corpus_files: Optional[list[Path]] = typer.Option(
        None, "--corpus", help="Training text: plain-text or jsonl ('text' field) files; default: built-in corpus."
    ),
    bits: int = typer.Option(DashKVConfig.bits),
    steps: int = typer.Option(1600, help="Stage-1 optimisation steps per layer."),
    keys_per_step: int = typer.Option(512, help="Random subset of a sequence's keys each step ranks."),
    lr: float = typer.Option(1e-2),
    seq_len: int = typer.Option(2048, help="Tokens per training sequence."),
    sequences: int = typer.Option(64, help="Training sequences, evenly spread over the corpus."),
    long_seq_len: int = typer.Option(8192, help="Tokens per long training sequence."),
    long_sequences: int = typer.Option(4, help="Long training sequences (pairs further apart than seq_len)."),
    natural_share: float = typer.Option(0.4, help="Share of training sequences kept at positions 0.. (others: random offsets)."),
    forward_weight: float = typer.Option(
        2.0, help="Weight of KL(P_teacher || P_student) added to the paper's KL(P_student || P_teacher); 0: the paper's loss."
    ),
    seed: int = typer.Option(0),
    layer_workers: int = typer.Option(2, help="Layers trained at once (threads sharing the torch threads)."),
    weights_dtype: str = typer.Option(
        "float16", help="dtype of the saved weights file: float16 (half the size), float32, bfloat16."
    ),
    bf16: Optional[bool] = typer.Option(
        None, "--bf16/--fp32", help="Teacher forward in bf16 (default: where the hardware makes it faster)."
    ),
    report: bool = typer.Option(True, help="Measure held-out quality at 2K and 8K tokens afterwards."),
    layer_check: bool = typer.Option(
        True, help="Run each layer alone through the tiers over a copied span at the longest training length; "
                   "layers whose next-token KL exceeds --max-layer-kl are left to full attention."),
    max_layer_kl: float = typer.Option(0.1, help="The layer check's limit (KL against full attention, nats)."),
    share_budget: bool = typer.Option(
        True, help="The layer check also measures each layer at a smaller and a larger high share and moves "
                   "high-tier keys from layers that lose nothing to layers that gain (the mean share unchanged)."),
    device: str = typer.Option(
        "auto", help="Where the teacher runs and the encoders train: auto (cuda when there), cpu, cuda, cuda:N."
    ),
) -> None:
    """Train hash encoders for a model (resumes from OUTPUT/checkpoint) and report held-out quality."""
    import json
    import time

    import torch
    from tqdm import tqdm

    from dashkv import corpus
    from dashkv.training.collect import LayerSignals, collect, fast_bfloat16, read_corpus, token_windows
    from dashkv.training.train import TrainConfig, train_encoders

    start = time.perf_counter()
    target = _device(device)  # before the model loads: a bad --device fails at once
    try:
        cfg = TrainConfig(bits=bits, steps=steps, keys_per_step=keys_per_step, lr=lr, seq_len=seq_len,
                          sequences=sequences, seed=seed, long_seq_len=long_seq_len, long_sequences=long_sequences,
                          natural_share=natural_share, forward_weight=forward_weight, layer_workers=layer_workers,
                          weights_dtype=weights_dtype)
    except ValueError as error:  # a clear message naming the option, not a traceback
        _option_error(error, {"min_position": "--seq-len/--long-seq-len"})
    if output.exists() and not output.is_dir():
        _user_error(f"--output {output}: is a file; give a directory for the encoders")
    if not max_layer_kl >= 0 or max_layer_kl == float("inf"):  # NaN fails the first test
        _user_error(f"--max-layer-kl {max_layer_kl}: must be a finite number >= 0")
    missing = [str(f) for f in corpus_files or [] if not f.is_file()]
    if missing:
        _user_error(f"--corpus: no such file {missing[0]}")
    lm, tok = _load_model(model)
    lm.to(target)
    limit = getattr(lm.config, "max_position_embeddings", None)
    if limit is not None and max(cfg.seq_len, cfg.long_seq_len if cfg.long_sequences else 0) > limit:
        option = "--seq-len" if cfg.seq_len > limit else "--long-seq-len"
        _user_error(f"{option}: seq_len={cfg.seq_len}, long_seq_len={cfg.long_seq_len} exceed the model's {limit} "
                    "positions (--long-sequences 0 drops the long ones)")  # fmt: skip
    if bf16 is None:
        bf16 = fast_bfloat16(lm.device)
    text = read_corpus(corpus_files) if corpus_files else corpus.text("train")
    batches = [(cfg.seq_len, cfg.sequences)] + ([(cfg.long_seq_len, cfg.long_sequences)] if cfg.long_sequences else [])
    signals = {}
    for length, count in batches:
        windows = token_windows(tok, text, length, count)
        typer.echo(f"training on {len(windows)} sequences of {length} tokens, on {lm.device}")
        part = collect(lm, windows, cfg.queries_per_sequence, cfg.min_position, cfg.seed,
                       progress=lambda xs: tqdm(xs, desc=f"teacher signals, {length} tokens"),
                       max_position=limit if cfg.random_offsets else None, bfloat16=bf16,
                       natural_share=cfg.natural_share)
        for layer, layer_signals in part.items():
            signals.setdefault(layer, LayerSignals()).extend(layer_signals)
    encoders = train_encoders(lm, signals, cfg, output, progress=lambda xs: tqdm(xs, desc="layers"))
    del signals
    seconds = time.perf_counter() - start
    typer.echo(f"trained in {seconds / 60:.1f} min -> {output}")
    metrics = {"train_seconds": seconds, "teacher_bf16": bf16,
               "config": cfg.__dict__ | {"dense_layers": list(cfg.dense_layers)}}
    if layer_check:
        metrics["layer_check"] = _check_layers(lm, tok, encoders, cfg, max_layer_kl, output, share_budget)
    if report:
        from dashkv.training.quality_cli import held_out_report

        metrics["held_out"] = held_out_report(lm, tok, encoders, cfg, echo=typer.echo)
    (Path(output) / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")


def _check_layers(model, tokenizer, encoders, cfg, max_kl: float, output: Path, share_budget: bool = True) -> dict:
    """``dashkv train``'s layer check (:mod:`dashkv.training.layer_check`): the layers over ``max_kl``
    go into the encoders' ``dense_layers`` and, with ``share_budget``, the high tier is shared between
    the others (``budget_scales``); the encoders are saved again."""
    import time

    import torch
    from tqdm import tqdm

    from dashkv.training.layer_check import (
        BUDGET_STEP,
        allocate_budget,
        copy_document,
        layer_check,
        layers_to_leave_dense,
    )

    length = cfg.long_seq_len if cfg.long_sequences else cfg.seq_len
    start = time.perf_counter()
    config = DashKVConfig(bits=cfg.bits, high=cfg.high, mid=cfg.mid, sinks=cfg.sinks, window=cfg.window,
                          dense_layers=cfg.dense_layers, dense_below=0)  # fmt: skip
    scales = (1 - BUDGET_STEP, 1 + BUDGET_STEP) if share_budget else ()
    check = layer_check(model, encoders, config, copy_document(tokenizer, length), scales=scales,
                        progress=lambda xs: tqdm(xs, desc=f"layer check, {length} tokens"))
    encoders.dense_layers = layers_to_leave_dense(check, max_kl)
    encoders.budget_scales = allocate_budget(check, encoders.dense_layers) if share_budget else {}
    encoders.save_pretrained(output, dtype=getattr(torch, cfg.weights_dtype))
    typer.echo(f"layer check at {length} tokens (copied tail perplexity {check['full']['perplexity']:.3f} with full "
               "attention): " + ", ".join(f"{k} KL {v['kl']:.4f}" for k, v in check.items() if k != "full")
               + f"; left to full attention: {list(encoders.dense_layers) or 'none'}"
               + f"; high-tier scales: {encoders.budget_scales or 'none'}")  # fmt: skip
    layers = {str(k): v | {"kl_at": {str(s): kl for s, kl in v.get("kl_at", {}).items()}} for k, v in check.items()}
    return {"length": length, "max_kl": max_kl, "seconds": time.perf_counter() - start, "layers": layers,
            "dense_layers": list(encoders.dense_layers),
            "budget_scales": {str(k): v for k, v in encoders.budget_scales.items()}}  # fmt: skip


from dashkv.eval.command import eval_command  # noqa: E402  (imports nothing heavy at module level)

app.command("eval")(eval_command)

bench_app = typer.Typer(help="Benchmarks against dense attention, timed in the same run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("attention")
def bench_attention(
    output: Path = typer.Option(Path("runs/bench"), help="Folder for attention.json and attention.png."),
    sizes: str = typer.Option("1024,4096,16384,32768,65536,131072", help="Comma-separated cache lengths S."),
    shapes: str = typer.Option("smollm2,llama3-8b", help="Comma-separated head shapes."),
    repeats: int = typer.Option(15),
    threads: int = typer.Option(2),
    bits: int = typer.Option(DashKVConfig.bits, help="Code length (the default config's: what ships)."),
    device: str = typer.Option("cpu", help="'cpu' (numba, fp32) or 'cuda' (Triton, bf16; needs a GPU and triton)."),
    batches: str = typer.Option("1,8", help="Comma-separated batch sizes (cuda only)."),
) -> None:
    """Decode-step attention latency: dense SDPA vs DASH-KV at growing cache lengths."""
    from tqdm import tqdm

    from dashkv.bench import attention

    chosen = tuple(s.strip() for s in shapes.split(","))
    unknown = [s for s in chosen if s not in attention.SHAPES]
    if unknown:
        _user_error(f"--shapes: {unknown} are not known; choose from {sorted(attention.SHAPES)}")
    lengths = _positive_ints("--sizes", sizes, "cache lengths", "1024,4096")
    _positive("--repeats", repeats)
    _positive("--threads", threads)
    _check_config(bits=bits)
    if device not in ("cpu", "cuda"):
        _user_error(f"--device {device!r} is not supported; choose 'cpu' or 'cuda'")
    batch_sizes = _positive_ints("--batches", batches, "batch sizes", "1,8")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            _user_error("--device cuda: no CUDA device is visible to torch")
    results = attention.run(lengths, chosen, repeats=repeats, threads=threads, bits=bits, output=output,
                            progress=lambda xs: tqdm(xs, desc="cases"), device=device,
                            batches=batch_sizes if device == "cuda" else None)  # fmt: skip
    if device == "cuda":
        from dashkv.bench import attention_gpu

        typer.echo(attention_gpu.table_gpu(results))
        typer.echo(f"\nwrote {output / 'attention_gpu.json'} and {output / 'attention_gpu.png'}")
        return
    typer.echo(attention.table(results))
    typer.echo(f"\nwrote {output / 'attention.json'} and {output / 'attention.png'}")


@bench_app.command("generate")
def bench_generate(
    output: Path = typer.Option(Path("runs/bench"), help="Folder for generate.json."),
    lengths: str = typer.Option("2048,4096,8192", help="Comma-separated context lengths in tokens (2048 or 2K)."),
    new_tokens: int = typer.Option(32, help="Tokens decoded per case (the first comes from the prefill)."),
    model: Optional[str] = typer.Option(None, help="HF directory or hub id; default: embedded SmolLM2-135M."),
    threads: int = typer.Option(2),
    busy: int = typer.Option(0, help="CPU-bound competitor processes running during the whole measurement."),
    dense_below: Optional[int] = typer.Option(
        None, help="DASH-KV rows: attend exactly below this many keys (default: the config's; 0: tiers at every length)."
    ),
) -> None:
    """End-to-end decode speed: full attention (stock, in-place cache), DASH-KV (share head, group, union), SnapKV.

    Every row at each context length in the same run; SnapKV keeps DASH-KV's high + mid budget.
    """
    from tqdm import tqdm

    from dashkv.bench import generate

    sizes = _lengths(lengths)
    try:  # every option checked before the model loads
        generate.check_options(sizes, new_tokens, busy, threads, flags=True)
    except ValueError as error:
        _user_error(str(error))
    if dense_below is not None:
        _check_config(dense_below=dense_below)
    _check_model_option(model)
    results = generate.run(sizes, new_tokens, threads, model, output, progress=lambda xs: tqdm(xs, desc="contexts"),
                           busy=busy, dense_below=dense_below)  # fmt: skip
    typer.echo(generate.table(results))
    typer.echo(f"\nwrote {output / 'generate.json'}")


@bench_app.command("prefill")
def bench_prefill(
    output: Path = typer.Option(Path("runs/bench"), help="Folder for prefill.json."),
    lengths: str = typer.Option("8K,16K,32K", help="Comma-separated context lengths in tokens (cut to the model's limit)."),
    modes: str = typer.Option("dense,tiered,blocks", help="Comma-separated prefill modes; dense is always timed."),
    model: Optional[str] = typer.Option(None, help="HF directory or hub id; default: embedded SmolLM2-135M."),
    threads: int = typer.Option(2),
) -> None:
    """Prefill time and fidelity: dense against tiered and block prefill of the same context, one run."""
    from tqdm import tqdm

    from dashkv.bench import prefill

    sizes = _lengths(lengths)
    chosen = tuple(m.strip() for m in modes.split(","))
    try:  # before the model loads
        prefill.check_options(sizes, chosen)
    except ValueError as error:
        _user_error(str(error))
    _check_model_option(model)
    results = prefill.run(sizes, chosen, model, output, threads, progress=lambda xs: tqdm(xs, desc="contexts"))
    typer.echo(prefill.table(results))
    typer.echo(f"\nwrote {output / 'prefill.json'}")


def _lengths(text: str) -> tuple[int, ...]:
    """``"2048,4K,8k"`` -> ``(2048, 4096, 8192)``: integers, or multiples of 1024 written with K."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        try:
            sizes.append(int(part[:-1]) * 1024 if part[-1:] in ("k", "K") else int(part))
        except ValueError:
            _user_error(f"--lengths {text!r}: give comma-separated integers, e.g. 2048,4096 or 2K,4K")
    return tuple(sizes)


@app.command("warmup")
def warmup_command() -> None:
    """Compile the DASH-KV CPU kernels once (numba's on-disk cache), so no first call waits for them."""
    from dashkv import warmup

    try:
        report = warmup.warmup()
    except ImportError as error:
        typer.echo(f"nothing to compile: the numba CPU backend is unavailable ({error})")
        return
    if report.compiled:
        typer.echo(f"compiled {len(report.compiled)} DASH-KV CPU kernels in {report.seconds:.1f} s")
    else:
        typer.echo(f"DASH-KV CPU kernels already compiled; loaded {len(report.loaded)} in {report.seconds:.1f} s")


def main(argv: Optional[list[str]] = None) -> None:
    """The ``dashkv`` entry point: usage errors (click's, typer's) as one line, like the commands' own."""
    import sys

    from transformers.utils import logging as hf_logging

    # typer may vendor its own click: take its ClickException from the exceptions it raises
    click_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    logging.basicConfig(level=logging.WARNING)
    hf_logging.disable_progress_bar()  # weight-loading bars drown the demo's output
    try:
        status = app(args=argv, prog_name="dashkv", standalone_mode=False)
    except click_error as error:  # a bad option value, a missing argument: one line, no usage box
        typer.echo(f"Error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
