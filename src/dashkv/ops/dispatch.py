"""Choose the kernel backend for the DASH-KV decode step.

A backend is a module exposing the functions of :mod:`dashkv.ops.reference` with the same signatures:
``hamming_distance``, ``select_smallest``, ``assign_tiers`` and ``tiered_attention``.
"""

from __future__ import annotations

from types import ModuleType

import torch

from dashkv.ops import reference

BACKENDS = ("auto", "reference")


def get_backend(name: str, device: torch.device) -> ModuleType:
    """Return the kernel module for ``name`` on ``device``; ``"auto"`` picks the fastest available."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not supported; choose one of {BACKENDS}")
    return reference
