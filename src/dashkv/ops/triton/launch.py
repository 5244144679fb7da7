"""Where the Triton kernels may run: CUDA tensors, or CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set before the kernels are imported: how the tests run them without a GPU)."""

from __future__ import annotations

import torch

from dashkv.ops.dispatch import triton_interpreting as interpreting


def check_device(**tensors: torch.Tensor | None) -> None:
    """Every given tensor on a CUDA device (or on the CPU under the interpreter); names the offender."""
    allowed = ("cuda", "cpu") if interpreting() else ("cuda",)
    for name, t in tensors.items():
        if t is not None and t.device.type not in allowed:
            raise ValueError(
                f"the triton backend takes CUDA tensors, got {name} on {t.device}"
                + ("" if interpreting() else " (CPU tensors only with TRITON_INTERPRET=1)")
            )
