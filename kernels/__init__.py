"""Public model ops, dispatched per device.

Every op has a pure-torch version in `kernels.reference`, the test oracle and the
fallback. On CPU the fused C++ ops of `kernels.cpu_native` run when they build here
(CONVEYOR_NATIVE_CPU=0 turns them off). Triton versions plug in through `_use_triton`.
This package imports torch (and later triton), never `server`.
"""

from __future__ import annotations

import torch

from kernels import cpu_native, reference
from kernels.reference import Workspace, build_cos_sin_cache

__all__ = [
    "Workspace",
    "build_cos_sin_cache",
    "paged_attention",
    "reference",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "write_kv",
]


def _use_triton(x: torch.Tensor) -> bool:
    """Whether a Triton kernel should handle tensors on x's device.

    The Triton kernels land here: return x.is_cuda once `kernels.triton_*` modules exist,
    and branch to them in the ops below.
    """
    del x
    return False


def _use_native(x: torch.Tensor) -> bool:
    """The compiled CPU ops (kernels.cpu_native) serve CPU tensors when they build here."""
    return x.device.type == "cpu" and cpu_native.enabled()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """See `reference.rms_norm`."""
    if x.dim() == 2 and _use_native(x):
        return cpu_native.rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
    cos_sin_cache: torch.Tensor, head_dim: int, is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See `reference.rotary_embedding`."""
    if is_neox and positions.dtype == torch.int64 and _use_native(query):
        return cpu_native.rotary_neox(positions, query, key, cos_sin_cache, head_dim)
    return reference.rotary_embedding(positions, query, key, cos_sin_cache, head_dim, is_neox)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """See `reference.silu_and_mul`."""
    # The native op wins on small decode batches; torch's vectorized exp wins on prefill.
    if x.dim() == 2 and x.shape[0] <= 256 and _use_native(x):
        return cpu_native.silu_and_mul(x)
    return reference.silu_and_mul(x)


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """See `reference.write_kv`."""
    reference.write_kv(key, value, kv_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: reference.Ints,
    seq_lens: reference.Ints, block_tables: torch.Tensor, scale: float,
    sliding_window: int | None = None, num_decodes: int = 0,
    out: torch.Tensor | None = None, workspace: Workspace | None = None,
) -> torch.Tensor:
    """See `reference.paged_attention`."""
    return reference.paged_attention(
        query, kv_cache, query_start_loc, seq_lens, block_tables, scale,
        sliding_window=sliding_window, num_decodes=num_decodes, out=out, workspace=workspace,
    )
