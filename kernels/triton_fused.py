"""Triton kernels for the elementwise parts of a decoder layer: RMSNorm (optionally fused with
the residual add), rotary embedding and SiLU-and-mul.

Semantics match the functions of the same name in `kernels.reference` (the oracle), with all
math in float32 and one rounding to the storage dtype where the reference rounds. Inputs may
be row-strided views (e.g. column slices of a fused qkv projection) as long as the last dim is
contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import triton_supported

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows up to this many elements stay in registers for rms_norm; longer ones are streamed.
_NORM_ONE_PASS_MAX = 8192
_NORM_CHUNK = 4096
# Elements of one [heads, rot_dim / 2] rope tile; bounds registers per program.
_ROPE_TILE = 1024
_SILU_BLOCK = 1024


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} dtype must be one of {_FLOAT_DTYPES}, got {t.dtype}")


def _check_devices(ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device}, expected {ref.device}")
    if not triton_supported(ref.device):
        raise ValueError(f"Triton kernels cannot run on {ref.device} here")


def _check_rows(name: str, t: torch.Tensor) -> None:
    """t must be 2-D with a contiguous last dim (any row stride)."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} needs a contiguous last dim, got strides {t.stride()}")


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_sum(x_row, r_row, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """x (+ residual, rounded to x's dtype like the unfused add) for one chunk of a row."""
    s = tl.load(x_row + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_row + cols, mask=mask, other=0.0)
        s = (s.to(tl.float32) + r.to(tl.float32)).to(x_row.dtype.element_ty)
    return s


@triton.jit
def _norm_store(s, rstd, w_ptr, o_row, cols, mask):
    """weight * round_to_x_dtype(s * rstd), as the reference rounds before the scale."""
    normed = (s.to(tl.float32) * rstd).to(s.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_row + cols, (normed * w).to(o_row.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr,
    x_row_stride, res_row_stride, out_row_stride, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    r_row = res_ptr + row * res_row_stride
    o_row = out_ptr + row * out_row_stride
    offs = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = offs < n_cols
        s = _load_sum(x_row, r_row, offs, mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(r_row + offs, s, mask=mask)
        sf = s.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(sf * sf, axis=0) / n_cols + eps)
        _norm_store(s, rstd, w_ptr, o_row, offs, mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            sf = _load_sum(x_row, r_row, cols, mask, HAS_RESIDUAL).to(tl.float32)
            acc += sf * sf
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
        # The sum is recomputed rather than re-read from `residual`: each element is then
        # loaded and overwritten by the same op, so no cross-thread ordering is needed.
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            s = _load_sum(x_row, r_row, cols, mask, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(r_row + cols, s, mask=mask)
            _norm_store(s, rstd, w_ptr, o_row, cols, mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [T, H] (any row stride) with weight [H], fp32 statistics.

    Without `residual` returns a new [T, H] tensor. With `residual` (same shape and dtype as
    x, any row stride) computes s = x + residual in x's dtype, WRITES s INTO `residual` IN
    PLACE, and returns (normed, residual), normed being a new tensor. The output dtype is
    promote(x.dtype, weight.dtype), as in the reference.
    """
    _check_rows("x", x)
    _check_float("x", x)
    _check_float("weight", weight)
    num_tokens, hidden = x.shape
    if weight.dim() != 1 or weight.shape[0] != hidden:
        raise ValueError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    weight = weight.contiguous()
    if residual is not None:
        _check_rows("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual must match x ({tuple(x.shape)}, {x.dtype}), "
                f"got {tuple(residual.shape)}, {residual.dtype}"
            )
        _check_devices(x, weight=weight, residual=residual)
    else:
        _check_devices(x, weight=weight)
    out = torch.empty(num_tokens, hidden, dtype=torch.promote_types(x.dtype, weight.dtype),
                      device=x.device)
    if num_tokens > 0 and hidden > 0:
        one_pass = hidden <= _NORM_ONE_PASS_MAX
        block = max(triton.next_power_of_2(hidden), 16) if one_pass else _NORM_CHUNK
        res = x if residual is None else residual  # placeholder pointer when unused
        _rms_norm_kernel[(num_tokens,)](
            x, res, weight, out,
            x.stride(0), res.stride(0), out.stride(0), hidden, float(eps),
            HAS_RESIDUAL=residual is not None, ONE_PASS=one_pass, BLOCK=block,
            num_warps=max(1, min(16, block // 512)),
        )
    return out if residual is None else (out, residual)


# --------------------------------------------------------------------------------------------
# Rotary embedding
# --------------------------------------------------------------------------------------------


@triton.jit
def _rope_heads(
    row_ptr, head_stride, num_heads, h0, cos, sin, half,
    IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Rotate heads h0 .. h0 + BLOCK_H of one token in place (first 2 * half dims of each)."""
    heads = h0 + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_R)
    mask = (heads[:, None] < num_heads) & (i[None, :] < half)
    if IS_NEOX:  # pairs (i, i + half)
        off1 = i
        off2 = i + half
    else:  # GPT-J pairs (2i, 2i + 1)
        off1 = 2 * i
        off2 = 2 * i + 1
    base = row_ptr + heads[:, None].to(tl.int64) * head_stride
    x1 = tl.load(base + off1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + off2[None, :], mask=mask, other=0.0).to(tl.float32)
    c = cos[None, :]
    s = sin[None, :]
    out_ty = row_ptr.dtype.element_ty
    tl.store(base + off1[None, :], (x1 * c - x2 * s).to(out_ty), mask=mask)
    tl.store(base + off2[None, :], (x2 * c + x1 * s).to(out_ty), mask=mask)


@triton.jit
def _rope_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr,
    q_row_stride, k_row_stride, q_head_stride, k_head_stride, cache_row_stride,
    num_q_heads, num_k_heads, half,
    IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(1) * BLOCK_H
    pos = tl.load(pos_ptr + token).to(tl.int64)
    i = tl.arange(0, BLOCK_R)
    cmask = i < half
    cache_row = cache_ptr + pos * cache_row_stride
    cos = tl.load(cache_row + i, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(cache_row + half + i, mask=cmask, other=0.0).to(tl.float32)
    # One program serves the same head block of q and k; the k part is fully masked once
    # h0 passes the (fewer, under GQA) KV heads.
    _rope_heads(q_ptr + token * q_row_stride, q_head_stride, num_q_heads, h0, cos, sin, half,
                IS_NEOX, BLOCK_H, BLOCK_R)
    _rope_heads(k_ptr + token * k_row_stride, k_head_stride, num_k_heads, h0, cos, sin, half,
                IS_NEOX, BLOCK_H, BLOCK_R)


def _heads_view(name: str, x: torch.Tensor, num_tokens: int, head_dim: int) -> tuple[int, int]:
    """(num_heads, head_stride) of query/key given as [T, H * D] or [T, H, D]."""
    _check_float(name, x)
    if x.dim() not in (2, 3) or x.shape[0] != num_tokens:
        raise ValueError(
            f"{name} must be [{num_tokens}, H * D] or [{num_tokens}, H, D], got {tuple(x.shape)}"
        )
    if x.dim() == 2:
        if x.shape[1] % head_dim:
            raise ValueError(f"{name} width {x.shape[1]} is not a multiple of head_dim {head_dim}")
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim, got strides {x.stride()}")
        return x.shape[1] // head_dim, head_dim
    if x.shape[2] != head_dim:
        raise ValueError(f"{name} head dim {x.shape[2]} != head_dim {head_dim}")
    if head_dim > 1 and x.stride(2) != 1:
        raise ValueError(f"{name} needs a contiguous last dim, got strides {x.stride()}")
    return x.shape[1], x.stride(1)


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
    cos_sin_cache: torch.Tensor, head_dim: int, is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query [T, Hq*D] / [T, Hq, D] and key (same forms) IN PLACE; returns them.

    cos_sin_cache is float32 [max_pos, rot_dim] (cos half, then sin half); only the first
    rot_dim dims of each head rotate. Positions are not range-checked (no host sync).
    """
    if positions.dim() != 1 or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"positions must be a 1-D int32/int64 tensor, got {tuple(positions.shape)} "
            f"{positions.dtype}"
        )
    num_tokens = positions.shape[0]
    if cos_sin_cache.dim() != 2 or cos_sin_cache.dtype != torch.float32:
        raise ValueError(
            f"cos_sin_cache must be float32 [max_pos, rot_dim], got "
            f"{tuple(cos_sin_cache.shape)} {cos_sin_cache.dtype}"
        )
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim % 2 or not 0 < rot_dim <= head_dim:
        raise ValueError(f"rot_dim {rot_dim} must be even and in (0, head_dim={head_dim}]")
    num_q_heads, q_head_stride = _heads_view("query", query, num_tokens, head_dim)
    num_k_heads, k_head_stride = _heads_view("key", key, num_tokens, head_dim)
    _check_devices(query, key=key, positions=positions, cos_sin_cache=cos_sin_cache)
    if num_tokens == 0 or max(num_q_heads, num_k_heads) == 0:
        return query, key
    cache = cos_sin_cache.contiguous()
    half = rot_dim // 2
    block_r = max(triton.next_power_of_2(half), 2)
    block_h = max(min(triton.next_power_of_2(max(num_q_heads, num_k_heads)),
                      _ROPE_TILE // block_r), 2)
    grid = (num_tokens, triton.cdiv(max(num_q_heads, num_k_heads), block_h))
    _rope_kernel[grid](
        positions.contiguous(), query, key, cache,
        query.stride(0), key.stride(0), q_head_stride, k_head_stride, cache.stride(0),
        num_q_heads, num_k_heads, half,
        IS_NEOX=bool(is_neox), BLOCK_H=block_h, BLOCK_R=block_r, num_warps=4,
    )
    return query, key


# --------------------------------------------------------------------------------------------
# SiLU-and-mul
# --------------------------------------------------------------------------------------------


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_row_stride, out_row_stride, inter,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    x_row = x_ptr + row * x_row_stride
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # sigmoid from e^-|gate| <= 1, which cannot overflow for large negative gates.
    e = tl.exp(-tl.abs(gate))
    sigmoid = tl.where(gate >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    y = gate * sigmoid * up
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (any row stride) -> new [T, I]: silu(x[:, :I]) * x[:, I:], fp32 math."""
    _check_rows("x", x)
    _check_float("x", x)
    if x.shape[1] % 2:
        raise ValueError(f"x width {x.shape[1]} must be even (gate and up halves)")
    _check_devices(x)
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, inter, dtype=x.dtype, device=x.device)
    if num_tokens > 0 and inter > 0:
        block = min(max(triton.next_power_of_2(inter), 16), _SILU_BLOCK)
        grid = (num_tokens, triton.cdiv(inter, block))
        _silu_and_mul_kernel[grid](
            x, out, x.stride(0), out.stride(0), inter,
            BLOCK=block, num_warps=max(1, min(8, block // 256)),
        )
    return out
