import importlib
import json
import logging
import subprocess
import sys

from dashkv import warmup


def test_warmup_leaves_the_decode_kernels_compiled():
    report = warmup.warmup()
    assert report.seconds > 0
    assert report.variants == ["share=head, float32", "share=group, float32", "share=union, float32",
                               "prefill=tiered, float32", "prefill=blocks, float32"]
    kernels = warmup.decode_kernels()
    assert sorted(kernels) == sorted(warmup.DECODE_KERNELS)  # every listed name is a kernel of ops/cpu
    assert kernels["step.step_kernel"].signatures  # the fused step (it compiles the passes it calls)
    assert all(k.signatures for k in kernels.values())
    assert warmup.cold_kernels() == []  # and on disk: a later process loads them
    assert set(report.compiled).isdisjoint(report.loaded)


_ENTRY_KERNELS = """
import inspect, json, re
from dashkv import warmup
warmup.warmup()
kernels = warmup.cpu_kernels()
sources = {name: inspect.getsource(k.py_func) for name, k in kernels.items()}
def called_by_a_kernel(name):
    pattern = re.compile(r"\\b" + re.escape(name.split(".")[-1]) + r"\\(")
    return any(pattern.search(src) for other, src in sources.items() if other != name)
print(json.dumps(sorted(n for n, k in kernels.items() if k.signatures and not called_by_a_kernel(n))))
"""


def test_decode_kernels_lists_every_kernel_the_path_calls_from_python():
    """A kernel the warm-up reached that no other kernel calls is called from Python: the cold check
    must know it (a new kernel in ops/cpu missing from DECODE_KERNELS fails here). In a fresh process:
    other tests reach kernels outside the inference path (the training report's selection)."""
    done = subprocess.run([sys.executable, "-c", _ENTRY_KERNELS], capture_output=True, text=True, check=True)
    entry = json.loads(done.stdout.strip().splitlines()[-1])
    assert entry and set(entry) <= set(warmup.DECODE_KERNELS)


def test_tiny_model_has_the_default_attention_geometry():
    config = warmup.tiny_model().config
    assert (config.head_dim, config.num_attention_heads, config.num_key_value_heads) == (64, 9, 3)


def _kernel_module(tmp_path, name):
    (tmp_path / f"{name}.py").write_text(
        "from numba import njit\n\n"
        "@njit(cache=True)\ndef used(x):\n    return x + 1\n\n"
        "@njit(cache=True)\ndef unused(x):\n    return x - 1\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))


def test_cold_kernels_tells_compiled_from_never_compiled(tmp_path):
    module = _kernel_module(tmp_path, "dashkv_warmup_probe")
    names = ["dashkv_warmup_probe.used", "dashkv_warmup_probe.unused"]
    assert warmup.cold_kernels([module.used, module.unused]) == names
    assert module.used(1) == 2
    assert warmup.cold_kernels([module.used, module.unused]) == ["dashkv_warmup_probe.unused"]
    # what a fresh process sees: the on-disk cache, not this process's signatures
    assert warmup._has_cached_version(module.used) and not warmup._has_cached_version(module.unused)


def test_warn_if_cold_logs_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(warmup, "_warned", False)
    monkeypatch.setattr(warmup, "cold_kernels", lambda kernels=None: ["fused.attend_kernel"])
    with caplog.at_level(logging.WARNING, logger="dashkv.warmup"):
        assert warmup.warn_if_cold() is True
        assert warmup.warn_if_cold() is False
    assert len(caplog.records) == 1
    assert "dashkv warmup" in caplog.records[0].getMessage() and "fused.attend_kernel" in caplog.records[0].getMessage()


def test_warn_if_cold_is_silent_when_warm(monkeypatch, caplog):
    monkeypatch.setattr(warmup, "_warned", False)
    monkeypatch.setattr(warmup, "cold_kernels", lambda kernels=None: [])
    with caplog.at_level(logging.WARNING, logger="dashkv.warmup"):
        assert warmup.warn_if_cold() is False
    assert not caplog.records
