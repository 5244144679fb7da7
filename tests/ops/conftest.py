"""Triton's interpreter for the Triton backend's tests where there is no GPU: it must be switched on
before the kernels are defined (imported), so here, before any test module of this folder loads."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
