"""Choose the kernel backend for the DASH-KV decode step.

A backend is a module that satisfies :class:`Backend`: the functions of :mod:`dashkv.ops.reference`
with the same signatures. :mod:`dashkv.attention` calls them without asking which backend it got.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Protocol

import torch

from dashkv.ops import reference
from dashkv.ops.reference import MidTierInputs, MidTierWeights, StepInputs, StepOutputs, StepSettings


class Backend(Protocol):
    """The kernel contract (shapes and meaning: :mod:`dashkv.ops.reference`)."""

    def encode_query(self, encoder, query: torch.Tensor) -> torch.Tensor: ...

    def encode_key(self, encoder, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode_step(self, inputs: StepInputs, settings: StepSettings, mid: MidTierWeights | None) -> StepOutputs: ...

    def hamming_distance(self, query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor: ...

    def select_smallest(
        self, dist: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor, lo: int, hi: int
    ) -> torch.Tensor: ...

    def assign_tiers(
        self, dist: torch.Tensor, visible: torch.Tensor, always: torch.Tensor, k_high: torch.Tensor,
        k_mid: torch.Tensor, lo: int, hi: int,
    ) -> torch.Tensor: ...  # fmt: skip

    def tiered_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tiers: torch.Tensor, scaling: float,
        mid: MidTierInputs | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...  # fmt: skip

BACKENDS = ("auto", "reference", "cpu")


@functools.lru_cache(maxsize=None)
def _cpu_backend() -> ModuleType | None:
    """The numba backend, or None where numba (or its LLVM) cannot be imported."""
    try:
        from dashkv.ops import cpu
    except ImportError:
        return None
    from dashkv.warmup import warn_if_cold

    warn_if_cold()  # once per process: a cold on-disk cache means the first call compiles
    return cpu


def get_backend(name: str, device: torch.device) -> Backend:
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
