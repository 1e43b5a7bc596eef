"""Public model ops, dispatched per device.

Every op has a pure-torch version in `kernels.reference`, the test oracle and the
fallback. On CUDA the Triton kernels (`kernels.triton_*`) run; on CPU the fused C++ ops
of `kernels.cpu_native` run when they build here (CONVEYOR_NATIVE_CPU=0 turns them off).
Triton modules are imported on first CUDA use, so CPU-only callers never load triton.
This package imports torch and triton, never `server`.
"""

from __future__ import annotations

import torch

from kernels import cpu_native, reference
from kernels.reference import Workspace, build_cos_sin_cache

__all__ = [
    "Workspace",
    "build_cos_sin_cache",
    "int4_linear",
    "int8_linear",
    "paged_attention",
    "reference",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "write_kv",
]


def _use_triton(x: torch.Tensor) -> bool:
    """Triton serves CUDA tensors; CPU tensors take the native or reference path (an
    explicit "triton" attention backend still runs Triton under the interpreter)."""
    return x.is_cuda


def _use_native(x: torch.Tensor) -> bool:
    """The compiled CPU ops (kernels.cpu_native) serve CPU tensors when they build here."""
    return x.device.type == "cpu" and cpu_native.enabled()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """See `reference.rms_norm`."""
    if _use_triton(x):
        from kernels import triton_fused

        if x.dim() != 2:  # e.g. Qwen3's per-head q/k norm over [T, heads, D]
            shape = x.shape
            res = None if residual is None else residual.reshape(-1, shape[-1])
            y = triton_fused.rms_norm(x.reshape(-1, shape[-1]), weight, eps, res)
            if isinstance(y, tuple):
                return y[0].view(shape), y[1].view(shape)
            return y.view(shape)
        return triton_fused.rms_norm(x, weight, eps, residual)
    if x.dim() == 2 and _use_native(x):
        return cpu_native.rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
    cos_sin_cache: torch.Tensor, head_dim: int, is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See `reference.rotary_embedding`; the Triton kernel rotates query/key in place."""
    if _use_triton(query):
        from kernels import triton_fused

        return triton_fused.rotary_embedding(positions, query, key, cos_sin_cache, head_dim,
                                             is_neox)
    if is_neox and positions.dtype == torch.int64 and _use_native(query):
        return cpu_native.rotary_neox(positions, query, key, cos_sin_cache, head_dim)
    return reference.rotary_embedding(positions, query, key, cos_sin_cache, head_dim, is_neox)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """See `reference.silu_and_mul`."""
    if _use_triton(x):
        from kernels import triton_fused

        return triton_fused.silu_and_mul(x)
    # The native op wins on small decode batches; torch's vectorized exp wins on prefill.
    if x.dim() == 2 and x.shape[0] <= 256 and _use_native(x):
        return cpu_native.silu_and_mul(x)
    return reference.silu_and_mul(x)


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """See `reference.write_kv`."""
    if _use_triton(key):
        from kernels import triton_kv_write

        triton_kv_write.write_kv(key, value, kv_cache, slot_mapping)
        return
    reference.write_kv(key, value, kv_cache, slot_mapping)


def _device_ints(x: reference.Ints, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.int32)
    return torch.tensor(list(x), dtype=torch.int32, device=device)


def paged_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: reference.Ints,
    seq_lens: reference.Ints, block_tables: torch.Tensor, scale: float,
    sliding_window: int | None = None, num_decodes: int = 0,
    out: torch.Tensor | None = None, workspace: Workspace | None = None,
) -> torch.Tensor:
    """See `reference.paged_attention`; on CUDA the Triton varlen kernel serves the whole batch."""
    if _use_triton(query):
        from kernels import triton_attention

        qsl = _device_ints(query_start_loc, query.device)
        lens = _device_ints(seq_lens, query.device)
        qsl_list, lens_list = reference._as_list(query_start_loc), reference._as_list(seq_lens)
        query_lens = [b - a for a, b in zip(qsl_list, qsl_list[1:])]
        return triton_attention.paged_attention(
            query, kv_cache, qsl, lens, block_tables.to(torch.int32), scale,
            max_query_len=max(query_lens, default=0), max_seq_len=max(lens_list, default=0),
            sliding_window=sliding_window, out=out,
        )
    return reference.paged_attention(
        query, kv_cache, query_start_loc, seq_lens, block_tables, scale,
        sliding_window=sliding_window, num_decodes=num_decodes, out=out, workspace=workspace,
    )


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ int8 weight [N, K] with per-channel scales -> [..., N]; see `kernels.quant`."""
    x2 = x.reshape(-1, x.shape[-1])
    if _use_triton(x):
        from kernels import triton_quant_matmul

        y = triton_quant_matmul.w8a16_matmul(x2, qweight, scales, bias)
    else:
        from kernels import quant

        y = quant.int8_matmul_ref(x2, qweight, scales, bias)
    return y.view(*x.shape[:-1], y.shape[-1])


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                qzeros: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ packed int4 weight (per-group scales and zero points) -> [..., N]."""
    x2 = x.reshape(-1, x.shape[-1])
    if _use_triton(x):
        from kernels import triton_quant_matmul

        y = triton_quant_matmul.w4a16_matmul(x2, qweight, scales, qzeros, group_size, bias)
    else:
        from kernels import quant

        y = quant.int4_matmul_ref(x2, qweight, scales, qzeros, group_size, bias)
    return y.view(*x.shape[:-1], y.shape[-1])
