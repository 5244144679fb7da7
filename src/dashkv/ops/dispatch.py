"""Choose the kernel backend for the DASH-KV decode step.

A backend is a module that satisfies :class:`Backend`: the functions of :mod:`dashkv.ops.reference`
with the same signatures. :mod:`dashkv.attention` calls them without asking which backend it got.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Protocol

import torch

from dashkv.ops import reference
from dashkv.ops.reference import LayerPlan, MidTierInputs, MidTierWeights, StepInputs, StepOutputs, StepSettings


class Backend(Protocol):
    """The kernel contract (shapes and meaning: :mod:`dashkv.ops.reference`)."""

    DENSE_DECODE: bool  # its dense_attention beats transformers' SDPA on a decode step's few queries

    def encode_query(self, encoder, query: torch.Tensor) -> torch.Tensor: ...

    def encode_key(self, encoder, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode_step(self, inputs: StepInputs, settings: StepSettings, mid: MidTierWeights | None) -> StepOutputs: ...

    def plan_layer(self, encoder, settings: StepSettings, mid: MidTierWeights | None) -> LayerPlan: ...

    def layer_step(self, plan: LayerPlan, inputs: StepInputs) -> StepOutputs: ...

    def hamming_distance(self, query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor: ...

    def block_distance(self, query_codes: torch.Tensor, key_codes: torch.Tensor, block: int) -> torch.Tensor: ...

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

    def dense_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor, scaling: float,
        want_probs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...  # fmt: skip

BACKENDS = ("auto", "reference", "cpu", "triton")


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


def triton_interpreting() -> bool:
    """True when Triton runs kernels through its interpreter on CPU tensors (``TRITON_INTERPRET=1``,
    set before the kernels are imported: how the tests run the Triton backend without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_backend() -> ModuleType | None:
    """The Triton backend, or None where triton cannot be imported (the ``gpu`` extra is not installed)."""
    try:
        from dashkv.ops import triton
    except ImportError:
        return None
    return triton


def get_backend(name: str, device: torch.device) -> Backend:
    """Return the kernel module for ``name`` on ``device``; ``"auto"`` picks the fastest available.

    ``"auto"``: the numba ``"cpu"`` backend for CPU tensors when numba imports, the ``"triton"``
    backend for CUDA tensors when triton imports, else the reference.
    ``"cpu"``: the numba backend; an error off the CPU or without numba.
    ``"triton"``: the Triton backend; an error off CUDA (CPU tensors only under ``TRITON_INTERPRET=1``)
    or without triton.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not supported; choose one of {BACKENDS}")
    if name == "reference":
        return reference
    on_cpu = torch.device(device).type == "cpu"
    if name == "triton":
        if torch.device(device).type != "cuda" and not triton_interpreting():
            raise ValueError(f"backend='triton' takes CUDA tensors, got device {device}; use 'auto' or 'reference'")
        backend = _triton_backend()
        if backend is None:
            raise ImportError("backend='triton' needs triton (pip install 'dashkv[gpu]')")
        return backend
    if name == "cpu":
        if not on_cpu:
            raise ValueError(f"backend='cpu' takes CPU tensors, got device {device}; use 'auto' or 'reference'")
        backend = _cpu_backend()
        if backend is None:
            raise ImportError("backend='cpu' needs numba (pip install numba)")
        return backend
    on_cuda = torch.device(device).type == "cuda"
    backend = _cpu_backend() if on_cpu else _triton_backend() if on_cuda else None
    return backend if backend is not None else reference
