"""Choose the kernel backend for the DASH-KV decode step.

A backend is a module exposing the functions of :mod:`dashkv.ops.reference` with the same signatures:
``hamming_distance``, ``select_smallest``, ``assign_tiers`` and ``tiered_attention``.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from dashkv.ops import reference

BACKENDS = ("auto", "reference", "cpu")


@functools.lru_cache(maxsize=None)
def _cpu_backend() -> ModuleType | None:
    """The numba backend, or None where numba (or its LLVM) cannot be imported."""
    try:
        from dashkv.ops import cpu
    except ImportError:
        return None
    return cpu


def get_backend(name: str, device: torch.device) -> ModuleType:
    """Return the kernel module for ``name`` on ``device``; ``"auto"`` picks the fastest available.

    ``"auto"``: the numba ``"cpu"`` backend for CPU tensors when numba imports, else the reference.
    ``"cpu"``: the numba backend; an error off the CPU or without numba.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not supported; choose one of {BACKENDS}")
    if name == "reference":
        return reference
    on_cpu = torch.device(device).type == "cpu"
    if name == "cpu":
        if not on_cpu:
            raise ValueError(f"backend='cpu' takes CPU tensors, got device {device}; use 'auto' or 'reference'")
        backend = _cpu_backend()
        if backend is None:
            raise ImportError("backend='cpu' needs numba (pip install numba)")
        return backend
    backend = _cpu_backend() if on_cpu else None
    return backend if backend is not None else reference
