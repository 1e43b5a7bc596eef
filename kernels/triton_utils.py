"""Where Triton kernels can run, and the knobs that differ between the GPU and the interpreter."""

from __future__ import annotations

import os

import torch

_TRUE = ("1", "true", "on", "yes")


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def triton_supported(device: torch.device | str) -> bool:
    """Triton kernels run natively on CUDA, and on CPU tensors under the interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreting()


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """The interpreter's bf16/fp16 tl.dot is wrong, so kernels upcast dot operands there."""
    return interpreting() and dtype in (torch.bfloat16, torch.float16)
