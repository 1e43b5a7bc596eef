"""Split-KV (flash-decoding) support for `kernels.triton_attention`.

With few sequences and long contexts, one program per (request, KV head) leaves most SMs idle.
The attention kernel can instead give each (request, KV head, split) program a contiguous share
of the KV tiles; each writes an fp32 partial output (already normalized by its own softmax
sum) and the base-2 log-sum-exp of its scores. This module picks the number of splits and
merges the partials: out = sum_s 2^(lse_s - lse) * partial_s with lse = log2(sum_s 2^lse_s).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.triton_utils import interpreting

# Shorter contexts fit one program per (request, KV head) fine; splitting only adds a merge.
_MIN_SPLIT_SEQ_LEN = 1024
# Each split walks at least this many KV tiles, so the merge stays cheap next to the work.
_MIN_TILES_PER_SPLIT = 2
_MAX_SPLITS = 64


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def auto_num_splits(device: torch.device, num_programs: int, max_query_len: int,
                    max_seq_len: int, block_n: int) -> int:
    """Splits per (request, KV head) for a batch; 1 means the plain single-pass kernel.

    Split only all-decode batches with long contexts whose num_programs (S * Hkv) programs
    would fill less than two programs per SM. Never on CPU / the interpreter.
    """
    if device.type != "cuda" or interpreting():
        return 1
    if max_query_len != 1 or max_seq_len < _MIN_SPLIT_SEQ_LEN:
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    target = 2 * _sm_count(index)
    if num_programs >= target:
        return 1
    most = max(1, max_seq_len // (block_n * _MIN_TILES_PER_SPLIT))
    return max(1, min(triton.cdiv(target, num_programs), most, _MAX_SPLITS))


@triton.jit
def _merge_splits_kernel(
    part_o_ptr, part_lse_ptr, o_ptr, qsl_ptr,
    num_seqs, num_heads, num_splits, stride_ot,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    # Rows past the last request are padding: never written (read on device, no host sync).
    row_ok = token < tl.load(qsl_ptr + num_seqs)
    offs_s = tl.arange(0, SPLITS_PAD)
    s_ok = (offs_s < num_splits) & row_ok
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_DIM
    base = (token * num_heads + head) * num_splits + offs_s

    lse = tl.load(part_lse_ptr + base, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    # Splits that saw no visible key have lse = -inf and weigh 0.
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    total = tl.sum(w, 0)
    w = w / tl.where(total == 0.0, 1.0, total)
    parts = tl.load(part_o_ptr + base[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0)
    tl.store(o_ptr + token * stride_ot + head * HEAD_DIM + offs_d,
             out.to(o_ptr.dtype.element_ty), mask=d_ok & row_ok)


def merge_splits(part_o: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor,
                 query_start_loc: torch.Tensor) -> None:
    """Combine part_o [T, H, splits, D] (fp32) by part_lse [T, H, splits] into out [T, H, D].

    Only rows below query_start_loc[-1] are written.
    """
    num_tokens, num_heads, num_splits, head_dim = part_o.shape
    if part_lse.shape != (num_tokens, num_heads, num_splits):
        raise ValueError(f"part_lse must be {(num_tokens, num_heads, num_splits)}, "
                         f"got {tuple(part_lse.shape)}")
    if not (part_o.is_contiguous() and part_lse.is_contiguous()):
        raise ValueError("part_o and part_lse must be contiguous")
    if out.shape != (num_tokens, num_heads, head_dim) or out.stride(2) != 1 or (
            num_heads > 1 and out.stride(1) != head_dim):
        raise ValueError(f"out must be [{num_tokens}, {num_heads}, {head_dim}] with packed heads")
    if num_tokens == 0:
        return
    head_pad = triton.next_power_of_2(head_dim)
    splits_pad = max(2, triton.next_power_of_2(num_splits))
    _merge_splits_kernel[(num_tokens, num_heads)](
        part_o, part_lse, out, query_start_loc,
        query_start_loc.shape[0] - 1, num_heads, num_splits, out.stride(0),
        HEAD_DIM=head_dim, HEAD_PAD=head_pad, SPLITS_PAD=splits_pad,
        num_warps=max(2, min(8, splits_pad * head_pad // 1024)),
    )
