"""Triton scatter of new key/value rows into the paged KV cache.

Same semantics as `kernels.reference.write_kv`: token t's key and value [Hkv, D] land at flat
slot slot_mapping[t] (block_id * block_size + offset) of a layer's cache
[2, num_blocks, block_size, Hkv, D], cast to the cache dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import triton_supported

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements of one token's [Hkv, D] row copied per program; bigger rows split over grid axis 1.
_MAX_BLOCK = 2048


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    key_row_stride, value_row_stride, row_size,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    # A pool of a few million slots times Hkv * D overflows int32 offsets.
    slot = tl.load(slot_ptr + token).to(tl.int64)
    # Negative slots (padding) are skipped rather than written out of bounds.
    mask = (cols < row_size) & (slot >= 0)
    dst = slot * row_size + cols
    k = tl.load(key_ptr + token * key_row_stride + cols, mask=mask)
    v = tl.load(value_ptr + token * value_row_stride + cols, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check_rows(name: str, x: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    """x must be [T, Hkv, D] whose heads are packed within a row (any row stride)."""
    if x.dim() != 3 or tuple(x.shape[1:]) != (num_kv_heads, head_dim):
        raise ValueError(
            f"{name} must be [T, {num_kv_heads}, {head_dim}] to match kv_cache, "
            f"got {tuple(x.shape)}"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} dtype must be one of {_FLOAT_DTYPES}, got {x.dtype}")
    if x.shape[0] > 0 and (x.stride(2) != 1 or (num_kv_heads > 1 and x.stride(1) != head_dim)):
        raise ValueError(
            f"{name} needs stride(-1) == 1 and stride(1) == head_dim ({head_dim}), "
            f"got strides {x.stride()}"
        )


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store key/value [T, Hkv, D] at flat slots of kv_cache, in place. See module docstring.

    key/value may be row-strided views (column slices of a fused qkv output); kv_cache must be
    contiguous; slot_mapping is int32 or int64 [T]. Slots are not range-checked (that would
    need a host sync): callers pass valid slots, negative ones are skipped.
    """
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            f"kv_cache must be [2, num_blocks, block_size, Hkv, D], got {tuple(kv_cache.shape)}"
        )
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    if kv_cache.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"kv_cache dtype must be one of {_FLOAT_DTYPES}, got {kv_cache.dtype}")
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    _check_rows("key", key, num_kv_heads, head_dim)
    _check_rows("value", value, num_kv_heads, head_dim)
    num_tokens = key.shape[0]
    if value.shape[0] != num_tokens:
        raise ValueError(f"key has {num_tokens} tokens but value has {value.shape[0]}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != num_tokens:
        raise ValueError(
            f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}"
        )
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    for name, t in (("value", value), ("kv_cache", kv_cache), ("slot_mapping", slot_mapping)):
        if t.device != key.device:
            raise ValueError(f"{name} is on {t.device} but key is on {key.device}")
    if not triton_supported(key.device):
        raise ValueError(f"Triton kernels cannot run on {key.device} here")
    if num_tokens == 0:
        return
    row_size = num_kv_heads * head_dim
    block = min(triton.next_power_of_2(row_size), _MAX_BLOCK)
    grid = (num_tokens, triton.cdiv(row_size, block))
    # kv_cache[0] / kv_cache[1] are separate base pointers, so the V half's offset (which can
    # exceed 2^31 elements) never enters kernel arithmetic.
    _write_kv_kernel[grid](
        key, value, kv_cache[0], kv_cache[1], slot_mapping.contiguous(),
        key.stride(0), value.stride(0), row_size,
        BLOCK=block, num_warps=max(1, min(8, block // 256)),
    )
