"""A registration of an attention function takes effect even after kvpress wrapped the names registered
before its import (transformers' local overrides shadow later class-wide registrations)."""

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dashkv.registry import register_attention
from dashkv.training.collect import collect


def test_a_later_registration_wins_over_a_local_wrapper():
    def first(*args, **kwargs):
        return "first"

    def second(*args, **kwargs):
        return "second"

    register_attention("dashkv_test_registry", first)
    ALL_ATTENTION_FUNCTIONS["dashkv_test_registry"] = lambda *a, **k: first(*a, **k)  # what kvpress does
    register_attention("dashkv_test_registry", second)
    assert ALL_ATTENTION_FUNCTIONS["dashkv_test_registry"] is second
    register_attention("dashkv_test_registry", first)  # and without a local entry to drop
    assert ALL_ATTENTION_FUNCTIONS["dashkv_test_registry"] is first


def test_teacher_signals_are_collected_after_kvpress_patched_the_attention_functions(tiny_qwen2):
    from kvpress.attention_patch import patch_attention_functions

    windows = [torch.randint(3, 97, (120,), generator=torch.Generator().manual_seed(0))]
    layers = sorted(collect(tiny_qwen2, windows, 8, 100))
    patch_attention_functions()  # what `import kvpress` runs: the current recorder is wrapped locally
    again = collect(tiny_qwen2, windows, 8, 100)
    assert sorted(again) == layers and layers
    assert all(len(signals.keys) == 1 for signals in again.values())
