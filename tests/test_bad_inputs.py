"""Bad settings, broken encoder files, inputs and modes DASH-KV cannot serve, and CLI misuse: one table.

Every case either works (its own checks pass) or is refused: an error of the expected type whose
message names the argument (the words listed). Refusals from the CLI are one line on stderr with exit
status 2 and no traceback, and they come before any model loads unless the case gives one. After every
case the tiny model is as it was: attention implementation, no hooks, the same greedy tokens.

``verdict`` also classifies outcomes as the issue did (silently wrong / unclear / clear / works), which
is how the counts before and after the change were taken.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

import dashkv
from dashkv import DashKVConfig, HashEncoders

WORKS, WARNS = "works", "warns"


class CLIError(Exception):
    """A CLI run that exited with a non-zero status; the message is what it printed on stderr."""


@dataclass
class Case:
    name: str
    run: Callable
    expect: object  # an exception type, WORKS or WARNS
    words: tuple[str, ...] = ()


CASES: list[Case] = []


def case(name: str, expect: object, *words: str):
    def register(run: Callable) -> Callable:
        CASES.append(Case(name, run, expect, words))
        return run

    return register


class CharTokenizer:
    """Stands in for a tokenizer in CLI runs on the tiny model: one token per character."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        return SimpleNamespace(input_ids=torch.tensor([[3 + ord(c) % 90 for c in text]]))

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids.tolist())


@dataclass
class Env:
    model: torch.nn.Module
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture
    caplog: pytest.LogCaptureFixture
    others: list = field(default_factory=list)  # (model, greedy tokens) of models a case built

    def enc(self, bits: int = 32, seed: int = 0) -> HashEncoders:
        return HashEncoders.random(self.model, bits=bits, seed=seed)

    def saved(self, name: str = "enc", **kwargs) -> Path:
        return self.enc().save_pretrained(self.tmp / name, **kwargs)

    def ids(self, n: int = 24, seed: int = 0) -> torch.Tensor:
        return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))

    def other(self, model: torch.nn.Module) -> torch.nn.Module:
        self.others.append((model, greedy(model)))
        return model

    def cli(self, *args: str, model_loads: bool = False) -> str:
        """Run ``dashkv ARGS`` as the entry point does; the tiny model stands in for any model it loads."""
        from dashkv import cli

        def load(name=None, **kwargs):
            if not model_loads:
                raise AssertionError("the model was loaded before the options were checked")
            return self.model, CharTokenizer()

        self.monkeypatch.setattr(dashkv, "load_model", load)
        self.capsys.readouterr()
        try:
            cli.main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        except TypeError as error:  # an entry point without argv (before this change): typer's own runner
            if "positional argument" not in str(error):
                raise
            from typer.testing import CliRunner

            result = CliRunner().invoke(cli.app, list(args))
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                raise result.exception
            code, printed = result.exit_code, result.output
            if code:
                raise CLIError(printed)
            return printed
        out = self.capsys.readouterr()
        if code:
            lines = [line for line in out.err.splitlines() if line.strip()]
            if len(lines) != 1 or "Traceback" in out.err:
                raise AssertionError(f"not one line: {out.err!r}")
            raise CLIError(lines[0])
        return out.out


def greedy(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 23).view(1, -1) % model.config.vocab_size
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)


def _tiny(kind: str, **settings):
    from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    geometry = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")  # fmt: skip
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**geometry, **settings)).eval()
    return Qwen3ForCausalLM(Qwen3Config(**geometry, head_dim=8, **settings)).eval()


def _enter(model, *args, **kwargs):
    with dashkv.enable(model, *args, **kwargs):
        pass


# --------------------------------------------------------------------------------------------- settings

_BAD_SETTINGS = [
    (dict(momentum_ratio=float("nan")), "momentum_ratio"),
    (dict(momentum_ratio=0.0), "momentum_ratio"),
    (dict(spatial_discount=float("nan")), "spatial_discount"),
    (dict(spatial_discount=2.0), "spatial_discount"),
    (dict(spatial_discount=-5000.0), "spatial_discount"),
    (dict(temporal_discount=float("-inf")), "temporal_discount"),
    (dict(dense_layers=3), "dense_layers"),
    (dict(dense_layers="0"), "dense_layers"),
    (dict(dense_layers=(True,)), "dense_layers"),
    (dict(dense_layers=(-1,)), "dense_layers"),
    (dict(high=True), "high"),
    (dict(high=float("inf")), "high"),
    (dict(high=1.5), "high"),
    (dict(mid=float("nan")), "mid"),
    (dict(high="0.1"), "high"),
    (dict(high=0.7, mid=0.4), "high + mid"),
    (dict(bits=64.0), "bits"),
    (dict(bits=True), "bits"),
    (dict(bits=48), "bits"),
    (dict(sinks=2.5), "sinks"),
    (dict(sinks=-1), "sinks"),
    (dict(window=0), "window"),
    (dict(window=True), "window"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(vote_fraction=float("nan")), "vote_fraction"),
    (dict(vote_fraction=0.0), "vote_fraction"),
    (dict(momentum_decay=1.0), "momentum_decay"),
    (dict(consensus="yes"), "consensus"),
    (dict(momentum=1), "momentum"),
    (dict(prefill="sparse"), "prefill"),
    (dict(backend="cuda"), "backend"),
    (dict(share="kv"), "share"),
    (dict(selector="oracle"), "mid"),
]
for _kwargs, _word in _BAD_SETTINGS:
    case(f"DashKVConfig({', '.join(f'{k}={v!r}' for k, v in _kwargs.items())})", ValueError, _word)(
        lambda env, kwargs=_kwargs: DashKVConfig(**kwargs)
    )

for _name, _value in (("high", 5.0), ("window", 0), ("chunk_size", 0), ("dense_layers", 3)):

    def _assign(env, name=_name, value=_value):
        config = DashKVConfig(bits=32, dense_layers=())
        setattr(config, name, value)  # accepted before: every key high, or range() arg 3 must not be zero
        with dashkv.enable(env.model, env.enc(), config):
            env.model.generate(env.ids(), max_new_tokens=2, do_sample=False)

    case(f"cfg.{_name} = {_value!r} after construction", dataclasses.FrozenInstanceError, _name)(_assign)


@case("dataclasses.replace(cfg, chunk_size=0)", ValueError, "chunk_size")
def _replace_bad(env):
    dataclasses.replace(DashKVConfig(), chunk_size=0)


@case("dataclasses.replace(cfg, high=0.1) gives a new valid config", WORKS)
def _replace_good(env):
    config = DashKVConfig()
    changed = dataclasses.replace(config, high=0.1)
    assert (changed.high, config.high) == (0.1, 0.05)


@case("dense_layers as a list is kept as a tuple", WORKS)
def _dense_list(env):
    layers = DashKVConfig(dense_layers=[2, 0]).dense_layers
    assert isinstance(layers, tuple) and set(layers) == {0, 2}


# ------------------------------------------------------------------------------------ enable arguments


@case("enable(model, 'dir') loads the encoders", WORKS)
def _enable_path(env):
    path = env.saved()
    with dashkv.enable(env.model, str(path), dict(dense_layers=(), sinks=2, window=8, dense_below=0)) as stats:
        env.model.generate(env.ids(100), max_new_tokens=3, do_sample=False)
    assert stats.summary()["mean"]["low"] > 0


@case("enable(model, '/nope')", FileNotFoundError, "/nope")
def _enable_missing_path(env):
    _enter(env.model, "/nope/encoders")


@case("enable(model, enc, config={'high': 0.1}) builds the config", WORKS)
def _enable_mapping(env):
    with dashkv.enable(env.model, env.enc(), {"high": 0.1, "dense_layers": (), "window": 8, "dense_below": 0}) as stats:
        env.model.generate(env.ids(100), max_new_tokens=3, do_sample=False)
    assert 0 < stats.summary()["mean"]["high"] < 1


@case("enable(model, enc, config={'hihg': 0.1})", ValueError, "hihg")
def _enable_mapping_typo(env):
    _enter(env.model, env.enc(), {"hihg": 0.1})


@case("enable(model, enc, config={'high': 2})", ValueError, "high")
def _enable_mapping_bad(env):
    _enter(env.model, env.enc(), {"high": 2})


@case("enable(model, enc, config=42)", TypeError, "config")
def _enable_config_type(env):
    _enter(env.model, env.enc(), 42)


@case("enable(model, 42)", TypeError, "encoders")
def _enable_encoders_type(env):
    _enter(env.model, 42)


@case("enable('a model name')", TypeError, "model")
def _enable_model_type(env):
    _enter("SmolLM2")


@case("enable(..., allow_beyond_positions='yes')", TypeError, "allow_beyond_positions")
def _enable_flag_type(env):
    _enter(env.model, env.enc(), allow_beyond_positions="yes")


@case("NaN in key_proj in memory", ValueError, "key_proj")
def _nan_in_memory(env):
    enc = env.enc()
    with torch.no_grad():
        enc.layers[1].key_proj[0, 0, 0] = float("nan")
    with dashkv.enable(env.model, enc, DashKVConfig(bits=32, dense_layers=())):
        env.model.generate(env.ids(), max_new_tokens=2, do_sample=False)


@case("encoders.half() runs as a float32 copy", WORKS)
def _half_encoders(env):
    enc = env.enc().half()
    cfg = DashKVConfig(bits=32, dense_layers=(), high=0.2, mid=0.1, window=8)
    with dashkv.enable(env.model, enc, cfg):
        half = env.model.generate(env.ids(100), max_new_tokens=4, do_sample=False)
    with dashkv.enable(env.model, copy.deepcopy(enc).float(), cfg):
        cast = env.model.generate(env.ids(100), max_new_tokens=4, do_sample=False)
    assert torch.equal(half, cast)
    assert enc.layers[0].key_proj.dtype == torch.float16  # the caller's encoders are left as they were


@case("config.bits differs from the encoders'", ValueError, "config.bits")
def _bits_mismatch(env):
    _enter(env.model, env.enc(bits=32), DashKVConfig(bits=64))


@case("dense_layers past the model's layers", ValueError, "dense_layers")
def _dense_beyond(env):
    _enter(env.model, env.enc(), DashKVConfig(bits=32, dense_layers=(7,)))


@case("enable inside enable", ValueError, "already enabled")
def _nested(env):
    with dashkv.enable(env.model, env.enc(), DashKVConfig(bits=32)):
        _enter(env.model, env.enc(), DashKVConfig(bits=32))


@case("encoders of another geometry", ValueError, "num_layers")
def _other_shape(env):
    enc = HashEncoders(dict(model_type="qwen2", num_layers=5, num_heads=6, num_kv_heads=2, head_dim=16), bits=32)
    _enter(env.model, enc, DashKVConfig(bits=32))


@case("an exception inside the block", RuntimeError, "inside")
def _raise_inside(env):
    with dashkv.enable(env.model, env.enc(), DashKVConfig(bits=32)):
        env.model(env.ids())
        raise RuntimeError("raised inside the block")


# ---------------------------------------------------------------------------------------- encoder files


def _rewrite_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if key.startswith("model."):
            config["model"][key[6:]] = value
        elif value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def _data_start(path: Path) -> int:
    raw = (path / "encoders.safetensors").read_bytes()
    return 8 + int.from_bytes(raw[:8], "little")


@case("encoder file with bytes overwritten mid-file", ValueError, "encoders.safetensors", "weights_sha256")
def _overwritten(env):
    path = env.saved()
    weights = path / "encoders.safetensors"
    raw = bytearray(weights.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = b"\xff" * 64
    weights.write_bytes(bytes(raw))
    HashEncoders.from_pretrained(path)


for _field, _value, _word in [
    ("bits", 64, "bits"),
    ("bits", 7, "bits"),
    ("model.num_layers", 4, "num_layers"),
    ("model.num_kv_heads", 3, "num_kv_heads"),
    ("model.num_kv_heads", 4, "num_kv_heads"),
    ("model.head_dim", "16", "head_dim"),
    ("hidden", None, "hidden"),
    ("hidden", 0, "hidden"),
    ("format_version", 2, "format_version"),
    ("fingerprint", 5, "fingerprint"),
    ("weights_sha256", "abc", "weights_sha256"),
    ("weights_sha256", "0" * 64, "weights_sha256"),
    ("model", "llama", "model"),
]:

    def _edited(env, key=_field, value=_value):
        path = env.saved()
        _rewrite_config(path, **{key: value})
        HashEncoders.from_pretrained(path)

    case(f"config.json with {_field}={_value!r}", ValueError, "config.json" if _word != "weights_sha256" else _word,
         _word)(_edited)  # fmt: skip


@case("config.json that is not JSON", ValueError, "config.json", "JSON")
def _bad_json(env):
    path = env.saved()
    (path / "config.json").write_text("{'bits': 32,")
    HashEncoders.from_pretrained(path)


@case("a pickle renamed encoders.safetensors", ValueError, "encoders.safetensors", "safetensors")
def _pickle(env):
    path = env.saved()
    torch.save(env.enc().state_dict(), path / "encoders.safetensors")
    HashEncoders.from_pretrained(path)


@case("encoders.safetensors missing", FileNotFoundError, "encoders.safetensors")
def _no_weights(env):
    path = env.saved()
    (path / "encoders.safetensors").unlink()
    HashEncoders.from_pretrained(path)


@case("config.json missing", FileNotFoundError, "config.json")
def _no_config(env):
    path = env.saved()
    (path / "config.json").unlink()
    HashEncoders.from_pretrained(path)


@case("from_pretrained of the weights file itself", NotADirectoryError, "directory")
def _file_not_dir(env):
    HashEncoders.from_pretrained(env.saved() / "encoders.safetensors")


def _forge(path: Path, change: Callable[[dict], None]) -> None:
    """Rewrite the weights with ``change`` applied and a digest that matches: only the other checks stand."""
    from safetensors.torch import load_file, save_file

    from dashkv.encoders import weights_digest

    tensors = load_file(str(path / "encoders.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "encoders.safetensors"))
    _rewrite_config(path, weights_sha256=weights_digest(tensors))


@case("non-finite weights in the file", ValueError, "encoders.safetensors", "layers.1.key_proj", "non-finite")
def _nan_file(env):
    path = env.saved()
    _forge(path, lambda t: t["layers.1.key_proj"].view(-1)[5:9].fill_(float("nan")))
    HashEncoders.from_pretrained(path)


@case("an int32 tensor in the file", ValueError, "encoders.safetensors", "layers.0.mid_bias", "int32")
def _int_file(env):
    path = env.saved()
    _forge(path, lambda t: t.__setitem__("layers.0.mid_bias", t["layers.0.mid_bias"].to(torch.int32)))
    HashEncoders.from_pretrained(path)


@case("a tensor of the wrong shape in the file", ValueError, "layers.2.residual", "shape")
def _shape_file(env):
    path = env.saved()
    _forge(path, lambda t: t.__setitem__("layers.2.residual", t["layers.2.residual"][:, :16].contiguous()))
    HashEncoders.from_pretrained(path)


@case("an extra tensor in the file", ValueError, "encoders.safetensors", "unexpected", "layers.9.extra")
def _extra_file(env):
    path = env.saved()
    _forge(path, lambda t: t.__setitem__("layers.9.extra", torch.zeros(2)))
    HashEncoders.from_pretrained(path)


@case("a file without a digest (older dashkv) loads and says it cannot be checked", WARNS, "weights_sha256")
def _no_digest(env):
    path = env.saved()
    _rewrite_config(path, weights_sha256=None)
    loaded = HashEncoders.from_pretrained(path)
    assert torch.equal(loaded.layers[0].key_proj, env.enc().layers[0].key_proj)


@case("a float16 file round-trips with its digest", WORKS)
def _half_file(env):
    loaded = HashEncoders.from_pretrained(env.saved(dtype=torch.float16))
    assert torch.equal(loaded.layers[2].query_skip, env.enc().layers[2].query_skip.half().float())


@case("save_pretrained(dtype='float16')", ValueError, "dtype")
def _save_dtype_str(env):
    env.enc().save_pretrained(env.tmp / "x", dtype="float16")


# ------------------------------------------------------------------------------------- inputs and modes


@case("a prompt longer than the model's positions", ValueError, "input_ids", "max_position_embeddings=512")
def _too_long(env):
    with dashkv.enable(env.model, env.enc(), DashKVConfig(bits=32)):
        env.model.generate(env.ids(520), max_new_tokens=2, do_sample=False)


@case("generation that runs past the model's positions", ValueError, "max_position_embeddings=512")
def _runs_past(env):
    with dashkv.enable(env.model, env.enc(), DashKVConfig(bits=32)):
        env.model.generate(env.ids(510), max_new_tokens=5, do_sample=False)


@case("a long prompt with allow_beyond_positions=True, full tiers = plain transformers", WORKS)
def _beyond_opt_in(env):
    ids = env.ids(516)
    plain = env.model.generate(ids, max_new_tokens=2, do_sample=False)
    with dashkv.enable(env.model, env.enc(), DashKVConfig.full(bits=32), allow_beyond_positions=True):
        tiered = env.model.generate(ids, max_new_tokens=2, do_sample=False)
    assert torch.equal(plain, tiered)


@case("generate(use_cache=False) warns that nothing ran tiered", WARNS, "use_cache=False")
def _no_cache(env):
    with dashkv.enable(env.model, env.enc(), DashKVConfig(bits=32, dense_layers=())) as stats:
        env.model.generate(env.ids(), max_new_tokens=3, do_sample=False, use_cache=False)
    assert not stats.summary()


@case("output_attentions=True", ValueError, "output_attentions")
def _attentions(env):
    with dashkv.enable(env.model, env.enc(), DashKVConfig(bits=32)):
        env.model(env.ids(), output_attentions=True)


@case("model.forward = torch.compile(model.forward), then enable", ValueError, "torch.compile")
def _compiled_before(env):
    env.model.forward = torch.compile(env.model.forward)
    try:
        _enter(env.model, env.enc(), DashKVConfig(bits=32))
    finally:
        del env.model.forward


@case("model.forward compiled inside the block", ValueError, "torch.compile")
def _compiled_inside(env):
    try:
        with dashkv.enable(env.model, env.enc(), DashKVConfig(bits=32)):
            env.model.forward = torch.compile(env.model.forward)
            env.model(env.ids())
    finally:
        del env.model.forward


@case("a Mistral with sliding_window set, refused at enable", ValueError, "sliding_window=16")
def _mistral_window(env):
    model = env.other(_tiny("mistral", sliding_window=16))
    _enter(model, HashEncoders.random(model, bits=32), DashKVConfig(bits=32))


@case("a Mistral without sliding_window runs", WORKS)
def _mistral_full(env):
    model = env.other(_tiny("mistral", sliding_window=None))
    with dashkv.enable(model, HashEncoders.random(model, bits=32), DashKVConfig(bits=32, dense_layers=(), window=8, dense_below=0)) as stats:
        model.generate(env.ids(40), max_new_tokens=3, do_sample=False)
    assert stats.summary()


@case("a Qwen3 whose layers all attend to a sliding window, refused at enable", ValueError, "layer_types")
def _qwen3_window(env):
    model = env.other(_tiny("qwen3", use_sliding_window=True, sliding_window=16, max_window_layers=0))
    _enter(model, HashEncoders.random(model, bits=32), DashKVConfig(bits=32))


class _KeysFromBuffer(torch.nn.Module):
    """A key projection whose weight is a buffer, not a parameter (as fused or swapped projections)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.register_buffer("kernel", linear.weight.detach().clone())
        self.register_buffer("offset", linear.bias.detach().clone() if linear.bias is not None else None)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.kernel, self.offset)


@case("a model without a k_proj.weight parameter runs and says its fingerprint cannot be checked", WARNS,
      "k_proj.weight", "fingerprint")  # fmt: skip
def _no_key_weight(env):
    model = copy.deepcopy(env.model)
    enc = HashEncoders.random(model, bits=32)  # made while the model still had its projections
    for layer in model.model.layers:
        layer.self_attn.k_proj = _KeysFromBuffer(layer.self_attn.k_proj)
    model = env.other(model)
    with dashkv.enable(model, enc, DashKVConfig(bits=32, dense_layers=(), window=8, dense_below=0)) as stats:
        out = model.generate(env.ids(40), max_new_tokens=3, do_sample=False)
    assert stats.summary() and out.shape[1] == 43


@case("NaN queries", ValueError, "NaN")
def _nan_query(env):
    handle = env.model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: o * float("nan"))
    try:
        with dashkv.enable(env.model, env.enc(), DashKVConfig(bits=32, dense_layers=())):
            env.model(env.ids())
    finally:
        handle.remove()


@case("two threads generating on one enabled model keep their own state", WORKS)
def _two_threads(env):
    enc = env.enc()
    cfg = DashKVConfig(bits=32, dense_layers=(), high=0.2, mid=0.1, window=8, backend="reference")
    prompts = [env.ids(60, seed=1), env.ids(45, seed=2)]
    with dashkv.enable(env.model, enc, cfg):
        alone = [env.model.generate(p, max_new_tokens=6, do_sample=False) for p in prompts]
    # both threads inside the same layer of their forwards at once, every step
    barrier = threading.Barrier(2, timeout=20)
    def meet_other_thread(module, args):
        barrier.wait()

    meet = env.model.model.layers[1].self_attn.register_forward_pre_hook(meet_other_thread)
    results, errors = [None, None], []

    def run(i):
        try:
            results[i] = env.model.generate(prompts[i], max_new_tokens=6, do_sample=False)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            barrier.abort()

    env.caplog.clear()
    try:
        with dashkv.enable(env.model, enc, cfg):
            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        meet.remove()
    assert not errors, errors
    assert all(torch.equal(a, b) for a, b in zip(results, alone))
    assert "no DASH-KV cache" not in env.caplog.text  # neither saw the other's cache


@case("a DynamicCache passed in is upgraded and used", WORKS)
def _dynamic_cache(env):
    from transformers import DynamicCache

    with dashkv.enable(env.model, env.enc(), DashKVConfig(bits=32, dense_layers=(), window=8, dense_below=0)) as stats:
        env.model.generate(env.ids(100), max_new_tokens=3, do_sample=False, past_key_values=DynamicCache())
    assert stats.summary()["mean"]["low"] > 0


# ---------------------------------------------------------------------------------------------------- CLI

for _args, _words in [
    (["generate", "--file", "p.txt", "--high", "2"], ("--high", "[0, 1]")),
    (["generate", "hi", "--high", "abc"], ("--high",)),
    (["generate", "hi", "--window", "0"], ("--window",)),
    (["generate", "hi", "--sinks", "-1"], ("--sinks",)),
    (["generate", "hi", "--high", "0.9", "--mid", "0.5"], ("--high", "mid")),
    (["generate", "hi", "--bits", "7"], ("--bits",)),
    (["generate", "hi", "--max-new-tokens", "0"], ("--max-new-tokens",)),
    (["generate", "--file", "/nope/prompt.txt"], ("--file", "/nope/prompt.txt")),
    (["generate"], ("PROMPT", "--file")),
    (["generate", "hi", "--model", "/nope"], ("--model", "/nope")),
    (["generate", "hi", "--encoders", "/nope"], ("--encoders", "/nope")),
    (["generate", "hi", "--method", "sparse"], ("--method",)),
    (["demo", "--high", "2"], ("--high",)),
    (["demo", "--length", "50"], ("--length",)),
    (["demo", "--encoders", "/nope"], ("--encoders",)),
    (["bench", "attention", "--sizes", "-1"], ("--sizes",)),
    (["bench", "attention", "--sizes", "1024,x"], ("--sizes",)),
    (["bench", "attention", "--bits", "7"], ("--bits",)),
    (["bench", "attention", "--shapes", "gpt5"], ("--shapes",)),
    (["bench", "attention", "--repeats", "0"], ("--repeats",)),
    (["bench", "generate", "--lengths", "-1"], ("--lengths",)),
    (["bench", "generate", "--lengths", "2K,x"], ("--lengths",)),
    (["bench", "generate", "--new-tokens", "1"], ("--new-tokens",)),
    (["bench", "generate", "--model", "/nope"], ("--model",)),
    (["train", "--bits", "7"], ("--bits",)),
    (["train", "--lr", "nan"], ("--lr",)),
    (["train", "--steps", "0"], ("--steps",)),
    (["train", "--natural-share", "2"], ("--natural-share",)),
    (["train", "--weights-dtype", "int8"], ("--weights-dtype",)),
    (["train", "--seq-len", "100"], ("--seq-len",)),
    (["train", "--corpus", "/nope/corpus.txt"], ("--corpus",)),
    (["train", "--device", "tpu"], ("--device",)),
    (["train", "--model", "/nope"], ("--model",)),
    (["nosuch"], ("nosuch",)),
]:

    def _cli_error(env, args=_args):
        (env.tmp / "p.txt").write_text("a prompt")
        env.monkeypatch.chdir(env.tmp)
        env.cli(*args)

    case(f"dashkv {' '.join(_args)}", CLIError, *_words)(_cli_error)


@case("dashkv generate --model DIR without config.json", CLIError, "--model", "config.json")
def _cli_model_dir(env):
    (env.tmp / "empty").mkdir()
    env.cli("generate", "hi", "--model", str(env.tmp / "empty"))


@case("dashkv generate --encoders DIR with a corrupted file", CLIError, "--encoders", "weights_sha256")
def _cli_corrupted(env):
    path = env.saved()
    weights = path / "encoders.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 1
    weights.write_bytes(bytes(raw))
    env.cli("generate", "hi", "--encoders", str(path))


@case("dashkv train --output FILE", CLIError, "--output")
def _cli_output_file(env):
    (env.tmp / "taken").write_text("")
    env.cli("train", "--output", str(env.tmp / "taken"))


@case("dashkv generate --bits 64 with shipped 128-bit encoders", CLIError, "--bits 64", "cannot apply")
def _cli_bits_shipped(env):
    import dashkv.shipped

    env.monkeypatch.setattr(dashkv.shipped, "shipped_encoders", lambda model: HashEncoders.random(model, bits=128))
    env.cli("generate", "hi", "--bits", "64", model_loads=True)


@case("dashkv generate --bits 64 --encoders DIR of 32-bit encoders", CLIError, "--bits 64", "32-bit")
def _cli_bits_given(env):
    env.cli("generate", "hi", "--bits", "64", "--encoders", str(env.saved()), model_loads=True)


@case("dashkv generate with a prompt beyond the model's positions", CLIError, "--max-new-tokens", "512")
def _cli_too_long(env):
    env.cli("generate", "x" * 505, "--max-new-tokens", "8", model_loads=True)


@case("dashkv generate --encoders DIR runs", WORKS)
def _cli_generate(env):
    out = env.cli("generate", "hello there", "--encoders", str(env.saved()), "--max-new-tokens", "3",
                  model_loads=True)  # fmt: skip
    assert "[dashkv]" in out and "encoders:" in out


# ------------------------------------------------------------------------------------------------- table


def verdict(item: Case, env: Env) -> tuple[str, str]:
    """``("works" | "clear" | "unclear" | "silently wrong", what happened)`` of one case."""
    env.caplog.clear()
    try:
        with env.caplog.at_level(logging.WARNING):
            item.run(env)
    except BaseException as error:  # noqa: BLE001 - every outcome is classified
        text = f"{type(error).__name__}: {error}"
        if isinstance(item.expect, type) and isinstance(error, item.expect):
            named = all(word.lower() in str(error).lower() for word in item.words)
            return ("clear" if named else "unclear"), text
        if item.expect in (WORKS, WARNS) and isinstance(error, AssertionError) and "not one line" not in str(error):
            return "silently wrong", text  # it ran, but its result was wrong
        return "unclear", text
    if isinstance(item.expect, type):
        return "silently wrong", "accepted"
    if item.expect == WARNS and not all(w in env.caplog.text for w in item.words):
        return "silently wrong", "ran without saying so"
    return "works", ""


@pytest.fixture(scope="module")
def baseline(tiny_qwen2):
    return greedy(tiny_qwen2)


def test_table_has_every_case():
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)
    assert sum(c.run.__name__ == "_cli_error" or c.name.startswith("dashkv") for c in CASES) >= 30


@pytest.mark.parametrize("item", CASES, ids=[c.name for c in CASES])
def test_bad_input(item, tiny_qwen2, baseline, tmp_path, monkeypatch, capsys, caplog):
    env = Env(tiny_qwen2, tmp_path, monkeypatch, capsys, caplog)
    outcome, detail = verdict(item, env)
    assert outcome in ("works", "clear"), f"{outcome}: {detail}"
    for model, tokens in [(tiny_qwen2, baseline)] + env.others:  # the model is untouched afterwards
        assert model.config._attn_implementation == "sdpa"
        assert not model._forward_pre_hooks and "forward" not in vars(model)
        assert torch.equal(greedy(model), tokens)


def test_one_changed_byte_anywhere_in_the_weights_is_refused(tmp_path):
    shape = dict(model_type="llama", num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
    HashEncoders(shape, bits=16, hidden=2).save_pretrained(tmp_path)
    weights = tmp_path / "encoders.safetensors"
    raw = weights.read_bytes()
    start = _data_start(tmp_path)
    assert len(raw) - start == 4 * sum(p.numel() for p in HashEncoders(shape, bits=16, hidden=2).state_dict().values())
    for offset in range(start, len(raw)):
        changed = bytearray(raw)
        changed[offset] ^= 0x01 if offset % 2 else 0x80
        weights.write_bytes(bytes(changed))
        with pytest.raises(ValueError, match="weights_sha256"):
            HashEncoders.from_pretrained(tmp_path)
    weights.write_bytes(raw)
    HashEncoders.from_pretrained(tmp_path)  # the unchanged file still loads


def test_a_changed_header_byte_is_refused_or_changes_nothing(tmp_path):
    shape = dict(model_type="llama", num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
    original = HashEncoders(shape, bits=16, hidden=2)
    original.save_pretrained(tmp_path)
    weights = tmp_path / "encoders.safetensors"
    raw = weights.read_bytes()
    for offset in range(0, _data_start(tmp_path)):
        changed = bytearray(raw)
        changed[offset] = (changed[offset] + 1) % 256
        weights.write_bytes(bytes(changed))
        try:
            loaded = HashEncoders.from_pretrained(tmp_path)
        except ValueError:
            continue
        assert all(torch.equal(v, original.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_shipped_encoders_carry_a_digest_that_matches():
    from dashkv.shipped import shipped_dir

    for config in shipped_dir().glob("*/config.json"):
        assert len(json.loads(config.read_text())["weights_sha256"]) == 64
        HashEncoders.from_pretrained(config.parent)
