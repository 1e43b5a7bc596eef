"""Triton paged attention: one varlen launch for a mixed decode / prefill batch.

Same semantics as `kernels.reference.paged_attention`: request r owns query rows
query_start_loc[r]:query_start_loc[r + 1], its row i sits at position
seq_lens[r] - query_len + i and attends to the keys at positions <= that (and, with a sliding
window W, > position - W), read from kv_cache[0 / 1, block_tables[r, k // block_size],
k % block_size, kv_head]. Query head h reads KV head h // (Hq // Hkv).

One program handles (request, tile of BLOCK_Q query rows, KV head). The query heads sharing
that KV head are flattened with the rows into the M dimension of the tile, so a decode row
under GQA 8 still feeds a 16-row tl.dot and K/V are read once per head group. Softmax is
online (running max and sum, in fp32, base 2), and KV tiles outside the causal / window range
are never visited. With num_splits > 1 (flash-decoding) each program covers one contiguous
share of its KV tiles and writes a partial output and its log-sum-exp; `kernels.triton_decode`
merges the shares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_decode import auto_num_splits, merge_splits
from kernels.triton_utils import dot_in_fp32, interpreting, triton_supported

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_LOG2E = 1.4426950408889634
_INT32_MAX = 2**31 - 1


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, part_o_ptr, part_lse_ptr,
    qsl_ptr, seq_lens_ptr, bt_ptr,
    qk_scale, window, num_splits,
    stride_qt, stride_ot, stride_bt, stride_kb, stride_kt,
    stride_pt, stride_ph,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    req = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2) % NUM_KV_HEADS
    split = tl.program_id(2) // NUM_KV_HEADS

    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_len = seq_len - q_len

    # Row m of the tile is query row m // GROUP_PAD of the tile, head m % GROUP_PAD of the group;
    # rows past the request and heads past an odd group size are padding.
    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + offs_m // GROUP_PAD
    g = offs_m % GROUP_PAD
    row_ok = (q_idx < q_len) & (g < GROUP)
    head = kv_head * GROUP + g
    pos = ctx_len + q_idx
    token = (q_start + q_idx).to(tl.int64)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_DIM
    io_mask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(q_ptr + token[:, None] * stride_qt + (head * HEAD_DIM)[:, None] + offs_d[None, :],
                mask=io_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # Keys this tile can see: [first row's window start, last row's position]. Surplus tiles
    # (the grid is sized for the longest request) get an empty range and store nothing.
    first_pos = ctx_len + q_tile * BLOCK_Q
    live = q_tile * BLOCK_Q < q_len
    kv_hi = tl.minimum(first_pos + BLOCK_Q, seq_len)
    kv_lo = kv_hi * 0
    if USE_WINDOW:
        kv_lo = tl.maximum(first_pos - window + 1, 0)
    kv_lo = (kv_lo // BLOCK_N) * BLOCK_N
    kv_hi = tl.where(live, kv_hi, kv_lo)
    lo = kv_lo
    hi = kv_hi
    if SPLIT:
        n_tiles = tl.cdiv(kv_hi - kv_lo, BLOCK_N)
        per_split = tl.cdiv(n_tiles, num_splits)
        lo = tl.minimum(kv_lo + split * per_split * BLOCK_N, kv_hi)
        hi = tl.minimum(lo + per_split * BLOCK_N, kv_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    bt_row = bt_ptr + req.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_hi
        block_id = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0)
        # block_id * stride_kb passes 2^31 elements in big pools.
        kv_off = (block_id.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_kt
                  + kv_head * HEAD_DIM)
        k = tl.load(k_ptr + kv_off[None, :] + offs_d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        visible = (offs_n[None, :] <= pos[:, None]) & row_ok[:, None]
        if USE_WINDOW:
            visible = visible & (offs_n[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no visible key yet keep m = -inf; shift them by 0 to avoid NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            v = v.to(tl.float32)
        else:
            p = p.to(v.dtype)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if SPLIT:
        part = token * stride_pt + head * stride_ph + split
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=io_mask)
    else:
        o_ptrs = o_ptr + token[:, None] * stride_ot + (head * HEAD_DIM)[:, None] + offs_d[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=io_mask)


def _check_heads(name: str, x: torch.Tensor, num_heads: int, head_dim: int) -> None:
    """[T, H, D] with each row's heads packed (stride(2) == 1, stride(1) == D); any row stride."""
    if x.dim() != 3 or x.shape[1] != num_heads or x.shape[2] != head_dim:
        raise ValueError(f"{name} must be [T, {num_heads}, {head_dim}], got {tuple(x.shape)}")
    if x.stride(2) != 1 or (num_heads > 1 and x.stride(1) != head_dim):
        raise ValueError(
            f"{name} needs stride(2) == 1 and stride(1) == head_dim ({head_dim}), "
            f"got strides {x.stride()}"
        )


def _check_inputs(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                  seq_lens: torch.Tensor, block_tables: torch.Tensor,
                  out: torch.Tensor | None) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be [T, Hq, D], got {tuple(query.shape)}")
    if query.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"query dtype must be one of {_FLOAT_DTYPES}, got {query.dtype}")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            f"kv_cache must be [2, num_blocks, block_size, Hkv, D], got {tuple(kv_cache.shape)}"
        )
    if kv_cache.dtype != query.dtype:
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} differs from query's {query.dtype}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    hq, d = query.shape[1], query.shape[2]
    hkv = kv_cache.shape[3]
    if kv_cache.shape[4] != d:
        raise ValueError(f"kv_cache head dim {kv_cache.shape[4]} differs from query's {d}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if d < 1 or kv_cache.shape[2] < 1:
        raise ValueError("head dim and block size must be positive")
    _check_heads("query", query, hq, d)
    if out is not None:
        _check_heads("out", out, hq, d)
        if out.shape[0] != query.shape[0] or out.dtype != query.dtype:
            raise ValueError(
                f"out must be {tuple(query.shape)} {query.dtype}, "
                f"got {tuple(out.shape)} {out.dtype}"
            )
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if seq_lens.dim() != 1 or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(
            f"seq_lens must be [S] and query_start_loc [S + 1], got {tuple(seq_lens.shape)} "
            f"and {tuple(query_start_loc.shape)}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] < num_seqs:
        raise ValueError(f"block_tables must be [>= {num_seqs}, max_blocks], "
                         f"got {tuple(block_tables.shape)}")
    for name, t in (("query_start_loc", query_start_loc), ("seq_lens", seq_lens),
                    ("block_tables", block_tables)):
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dim")
    for name, t in (("kv_cache", kv_cache), ("query_start_loc", query_start_loc),
                    ("seq_lens", seq_lens), ("block_tables", block_tables), ("out", out)):
        if t is not None and t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if not triton_supported(query.device):
        raise ValueError(f"Triton kernels cannot run on {query.device} here")


def _tile_config(max_query_len: int, group_pad: int, head_pad: int,
                 dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_M, BLOCK_N, num_warps) for a batch.

    GPU sizes were checked with ptxas for sm_90 (no register spills for bf16 / fp16, Q plus
    two stages of K / V within shared memory).
    """
    elem = torch.finfo(dtype).bits // 8
    if interpreting():  # small tiles: the interpreter pays per element, not per instruction
        target_m, block_n = 16, 16
    elif elem == 4 or head_pad > 128:
        target_m, block_n = (32 if elem == 4 and head_pad > 128 else 64), 32
    else:
        target_m, block_n = (128 if max_query_len * group_pad >= 128 else 64), 64
    # Pure decode batches need one query row per tile; otherwise fill the tile with rows.
    rows = min(triton.next_power_of_2(max(max_query_len, 1)), max(target_m // group_pad, 1))
    block_m = max(16, rows * group_pad)
    block_q = block_m // group_pad
    num_warps = 8 if block_m * head_pad * elem >= 32 * 1024 else 4
    return block_q, block_m, block_n, num_warps


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    max_query_len: int,
    max_seq_len: int,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Varlen paged attention of query [T, Hq, D] over kv_cache; see the module docstring.

    kv_cache is [2, num_blocks, block_size, Hkv, D] (contiguous, query's dtype); query_start_loc
    [S + 1], seq_lens [S] and block_tables [S, max_blocks] are int32 (or int64) on query's
    device. max_query_len / max_seq_len are host ints that must bound the real lengths (the
    grid is sized from max_query_len without reading the device tensors). Rows of `out` past
    query_start_loc[S] are left untouched. num_splits forces the split-KV path with that many
    splits; None lets a heuristic choose (split-KV only for long all-decode batches on a GPU).
    Returns `out`, allocated like query if not given.
    """
    _check_inputs(query, kv_cache, query_start_loc, seq_lens, block_tables, out)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1 or None, got {num_splits}")
    if out is None:
        out = torch.empty_like(query)
    num_seqs = seq_lens.shape[0]
    num_tokens, hq, head_dim = query.shape
    _, _, block_size, hkv, _ = kv_cache.shape
    if num_seqs == 0 or num_tokens == 0 or max_query_len < 1:
        return out

    group = hq // hkv
    group_pad = triton.next_power_of_2(group)
    head_pad = max(16, triton.next_power_of_2(head_dim))
    block_q, block_m, block_n, num_warps = _tile_config(
        max_query_len, group_pad, head_pad, query.dtype)
    if num_splits is None:
        num_splits = auto_num_splits(query.device, num_seqs * hkv, max_query_len, max_seq_len,
                                     block_n)
        split = num_splits > 1
    else:
        split = True
    dot_fp32 = dot_in_fp32(query.dtype)
    if split:
        # fp32 partial outputs and base-2 log-sum-exps, one per (token, head, split).
        part_o = torch.empty(num_tokens, hq, num_splits, head_dim, dtype=torch.float32,
                             device=query.device)
        part_lse = torch.empty(num_tokens, hq, num_splits, dtype=torch.float32,
                               device=query.device)
    else:
        part_o = part_lse = out  # unused placeholders
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), hkv * num_splits)
    _paged_attention_kernel[grid](
        query, kv_cache[0], kv_cache[1], out, part_o, part_lse,
        query_start_loc, seq_lens, block_tables,
        scale * _LOG2E, min(sliding_window or 0, _INT32_MAX), num_splits,
        query.stride(0), out.stride(0), block_tables.stride(0),
        kv_cache.stride(1), kv_cache.stride(2),
        hq * num_splits, num_splits,
        GROUP=group, GROUP_PAD=group_pad, NUM_KV_HEADS=hkv,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_DIM=head_dim, HEAD_PAD=head_pad, BLOCK_SIZE=block_size,
        USE_WINDOW=sliding_window is not None, SPLIT=split, DOT_FP32=dot_fp32,
        # fp32 models: 3xTF32 keeps fp32 accuracy on tensor cores (plain fp32 dots spill).
        DOT_PRECISION="tf32x3" if query.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=2,
    )
    if split:
        merge_splits(part_o, part_lse, out, query_start_loc)
    return out
