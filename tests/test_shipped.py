"""The encoders shipped for the embedded default model: found by identity, used by default, and good
enough that the demo's pass key survives DASH-KV."""

import pytest
import torch

import dashkv
from dashkv.apply import attention_modules
from dashkv.attention import RUNTIME_KWARG
from dashkv.encoders import model_fingerprint
from dashkv.eval.runner import generate_answer
from dashkv.eval.tasks import passkey
from dashkv.shipped import shipped_dir, shipped_encoders


def test_shipped_encoders_are_found_for_the_default_model_only(default_model, tiny_qwen2):
    model, _ = default_model
    encoders = shipped_encoders(model)
    assert encoders.fingerprint == model_fingerprint(model)
    assert encoders.shape["num_layers"] == model.config.num_hidden_layers
    trained = encoders.layers[1]
    assert not torch.allclose(trained.mid_temperature, torch.ones_like(trained.mid_temperature))  # stage 2 ran
    with pytest.raises(ValueError, match="no shipped encoders"):
        shipped_encoders(tiny_qwen2)


def test_shipped_encoders_fit_the_size_limit():
    sets = [config.parent for config in shipped_dir().glob("*/config.json")]
    assert len(sets) >= 2  # the default model's and Gemma-3-270M's
    for folder in sets:
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        assert 0 < size <= 25 * 10**6, folder.name  # 25 MB a model


def test_enable_takes_the_shipped_encoders_by_default(default_model):
    model, _ = default_model
    shipped = shipped_encoders(model).state_dict()
    seen = []  # the runtime the attention function receives from enable's hook
    spy = attention_modules(model)[1].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs[RUNTIME_KWARG]), with_kwargs=True
    )
    try:
        with dashkv.enable(model):
            model(torch.tensor([[1, 2, 3]]))
    finally:
        spy.remove()
    used = seen[0].encoders.state_dict()
    assert used.keys() == shipped.keys() and all(torch.equal(used[k], shipped[k]) for k in used)


def test_shipped_encoders_answer_the_demo_pass_key(default_model):
    model, tok = default_model
    sample = passkey.make_sample(tok, 2000, 0)  # what `dashkv demo` asks
    encoders = shipped_encoders(model)
    full = generate_answer(model, tok, sample.context, sample.question, encoders=None, config=None)
    hashed = generate_answer(model, tok, sample.context, sample.question, encoders=encoders,
                             config=dashkv.DashKVConfig(bits=encoders.bits))
    assert passkey.score(full.text, sample.answer), full.text
    assert passkey.score(hashed.text, sample.answer), hashed.text
