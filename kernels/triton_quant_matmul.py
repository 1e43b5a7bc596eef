"""Triton W8A16 / W4A16 matmuls: y = x @ dequant(W).T with the weights unpacked tile by tile.

Layouts are those of `kernels.quant` (its pure-torch matmuls are the oracle). Each program owns
one [BLOCK_M, BLOCK_N] output tile and a range of K (split-K). Integer weights become exact
small integers in the activation dtype, so the dot runs on tensor cores and the scales
multiply the fp32 accumulator: per channel at the end (int8), per K tile (int4, whose tiles
never straddle a quantization group; group sizes not a multiple of 32 fall back to scaling
the weight tile before the dot). With split-K > 1 the programs of a tile combine through fp32
atomic adds into a zeroed buffer, then one cast.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from kernels.triton_utils import dot_in_fp32, triton_supported

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_GROUP_M = 8  # row tiles per launch band (L2 reuse of the weight columns a band reads)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map the 1-D program id to (row tile, column tile), band by band of GROUP_M row tiles,
    so concurrently running programs share both x rows and weight columns in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_band = GROUP_M * tiles_n
    band = pid // per_band
    first_m = band * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    local = pid - band * per_band
    return first_m + local % rows, local // rows


@triton.jit
def _epilogue(acc, scale_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_om,
              HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    """Optional per-column scale, bias (added by the first K split only), store or atomic add."""
    n_mask = offs_n < N
    if HAS_SCALE:
        scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc * scale[None, :]
    if HAS_BIAS:
        first = tl.program_id(1) == 0
        bias = tl.load(bias_ptr + offs_n, mask=n_mask & first, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mma(a, b, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """a @ b accumulated in fp32, b (small integers or weights) cast to a's dtype.

    IEEE keeps fp32 inputs off TF32. DOT_FP32 works around the interpreter, whose bf16 dot
    (and int -> bf16 cast) is wrong: it casts both operands to fp32 directly.
    """
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b.to(a.dtype), input_precision="ieee")
    else:
        return tl.dot(a, b.to(a.dtype))


@triton.jit
def _nibbles(packed, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """int32 [ROWS, BLOCK_N // 8] -> [ROWS, BLOCK_N] values 0..15: column 8c + j is nibble j
    (bits 4j..4j+3) of packed column c."""
    shifts = tl.arange(0, 8) * 4
    # Arithmetic shifts smear the sign bit of nibble 7; the mask drops it.
    nib = (packed[:, :, None] >> shifts[None, None, :]) & 0xF
    return tl.reshape(nib, (ROWS, BLOCK_N))


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          GROUP_M: tl.constexpr):
    """This program's output tile: its column-tile id, row / column / k offsets, and the
    row and column masks."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_n, offs_m, offs_n, tl.arange(0, BLOCK_K), offs_m < M, offs_n < N


@triton.jit
def _w8a16_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, k_per_split,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    _, offs_m, offs_n, offs_k, m_mask, n_mask = _tile(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    k_start = tl.program_id(1) * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        a = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = tl.load(w_cols + kk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
        # |q| <= 127 is exact in fp16/bf16: the dot stays on tensor cores.
        acc += _mma(a, q, DOT_FP32, IEEE)
    _epilogue(acc, scale_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_om,
              True, HAS_BIAS, ATOMIC)


@triton.jit
def _w4a16_kernel(
    x_ptr, qw_ptr, scale_ptr, qz_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_qw, stride_s, stride_qz, stride_om, k_per_split, group_size,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    GROUP_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_n, offs_m, offs_n, offs_k, m_mask, n_mask = _tile(M, N, BLOCK_M, BLOCK_N, BLOCK_K,
                                                          GROUP_M)
    # Packed columns are loaded once each ([.., BLOCK_N // 8] int32, no 8x re-reads) and
    # expanded to nibbles in registers. N % 8 == 0, so packed column c is in range iff its
    # 8 columns are.
    offs_c = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    c_mask = offs_c < N // 8
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    k_start = tl.program_id(1) * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        a = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        p_mask = k_mask[:, None] & c_mask[None, :]
        packed = tl.load(qw_ptr + kk.to(tl.int64)[:, None] * stride_qw + offs_c[None, :],
                         mask=p_mask, other=0)
        q = _nibbles(packed, BLOCK_K, BLOCK_N)
        if GROUP_ALIGNED:
            # The whole tile is one group: subtract its zeros, dot the exact small integers,
            # then scale the [BLOCK_M, BLOCK_N] partial sum once.
            grp = (k0 // group_size).to(tl.int64)
            zp = tl.load(qz_ptr + grp * stride_qz + offs_c, mask=c_mask, other=0)
            z = _nibbles(zp[None, :], 1, BLOCK_N)
            s = tl.load(scale_ptr + grp * stride_s + offs_n, mask=n_mask, other=0.0)
            acc += _mma(a, q - z, DOT_FP32, IEEE) * s.to(tl.float32)[None, :]
        else:
            grp = (kk // group_size).to(tl.int64)
            zp = tl.load(qz_ptr + grp[:, None] * stride_qz + offs_c[None, :], mask=p_mask,
                         other=0)
            z = _nibbles(zp, BLOCK_K, BLOCK_N)
            s = tl.load(scale_ptr + grp[:, None] * stride_s + offs_n[None, :],
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(x_ptr.dtype.element_ty)
            acc += _mma(a, w, DOT_FP32, IEEE)
    _epilogue(acc, scale_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_om,
              False, HAS_BIAS, ATOMIC)


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _config(m: int, dtype: torch.dtype) -> _Config:
    """Tile shapes for Hopper-class GPUs: decode (small M) streams weights in narrow column
    tiles and relies on split-K for parallelism; prefill uses large tiles. fp32 activations
    take half the K tile and fewer stages to stay within shared memory."""
    if m <= 16:
        cfg = _Config(16, 64, 128, 4, 4)
    elif m <= 64:
        cfg = _Config(max(16, triton.next_power_of_2(m)), 64, 128, 4, 4)
    else:
        cfg = _Config(128, 128, 64, 8, 3)
    if dtype == torch.float32:
        cfg = replace(cfg, block_k=64, num_stages=2)
    return cfg


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_plan(m: int, n: int, k: int, cfg: _Config, split_k: int | None,
                device: torch.device) -> tuple[int, int]:
    """(number of K splits, K elements per split, a multiple of BLOCK_K)."""
    k_tiles = max(1, triton.cdiv(k, cfg.block_k))
    if split_k is None:
        if m > 16:
            split_k = 1
        elif device.type == "cuda":
            # Enough programs for ~2 waves; each split keeps >= 2 K tiles to amortize its
            # atomics.
            tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
            want = triton.cdiv(2 * _sm_count(device.index or 0), tiles)
            split_k = max(1, min(want, k_tiles // 2, 32))
        else:
            split_k = min(2, k_tiles)  # the interpreter: small, but exercise the atomics
    tiles_per_split = triton.cdiv(k_tiles, max(1, min(split_k, k_tiles)))
    return triton.cdiv(k_tiles, tiles_per_split), tiles_per_split * cfg.block_k


def _check_common(x: torch.Tensor, k: int, n: int, tensors: dict[str, torch.Tensor],
                  bias: torch.Tensor | None, split_k: int | None) -> None:
    if x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"x must be float16/bfloat16/float32 [M, K], got {x.dtype} "
                         f"{tuple(x.shape)}")
    if x.shape[1] != k:
        raise ValueError(f"x has K = {x.shape[1]}, the weight K = {k}")
    if x.stride(1) != 1:
        raise ValueError("x's last dim must be contiguous")
    if not triton_supported(x.device):
        raise ValueError(f"Triton kernels cannot run on {x.device} here")
    if bias is not None:
        if bias.shape != (n,) or not bias.dtype.is_floating_point:
            raise ValueError(f"bias must be floating [{n}], got {bias.dtype} "
                             f"{tuple(bias.shape)}")
        tensors = {**tensors, "bias": bias}
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if split_k is not None and (not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be a positive int or None, got {split_k!r}")


def _launch_args(x: torch.Tensor, n: int, bias: torch.Tensor | None, split_k: int | None,
                 cfg: _Config) -> tuple[torch.Tensor, tuple[int, int], int, dict]:
    """Output buffer, grid, K per split and the shared meta-parameters."""
    m, k = x.shape
    splits, k_per_split = _split_plan(m, n, k, cfg, split_k, x.device)
    atomic = splits > 1
    if atomic:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), splits)
    meta = dict(
        HAS_BIAS=bias is not None, ATOMIC=atomic, DOT_FP32=dot_in_fp32(x.dtype),
        IEEE=x.dtype == torch.float32,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=_GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, grid, k_per_split, meta


def w8a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None, *, split_k: int | None = None) -> torch.Tensor:
    """x [M, K] @ (qweight int8 [N, K] * scales [N, None]).T (+ bias [N]) -> [M, N], x.dtype.

    split_k=None picks the number of K splits (more for small M); see `_split_plan`.
    """
    if qweight.dim() != 2 or qweight.dtype != torch.int8:
        raise ValueError(f"qweight must be int8 [N, K], got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n, k = qweight.shape
    if scales.shape != (n,) or not scales.dtype.is_floating_point:
        raise ValueError(f"scales must be floating [{n}], got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    _check_common(x, k, n, {"qweight": qweight, "scales": scales}, bias, split_k)
    m = x.shape[0]
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    cfg = _config(m, x.dtype)
    out, grid, k_per_split, meta = _launch_args(x, n, bias, split_k, cfg)
    _w8a16_kernel[grid](
        x, qweight, scales, bias, out, m, n, k, x.stride(0), qweight.stride(0), out.stride(0),
        k_per_split, **meta,
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 qzeros: torch.Tensor, group_size: int, bias: torch.Tensor | None = None, *,
                 split_k: int | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(qweight, scales, qzeros).T (+ bias [N]) -> [M, N] in x.dtype.

    qweight int32 [K, N // 8], qzeros int32 [G, N // 8], scales [G, N] with
    G = ceil(K / group_size) (layout of `kernels.quant`).
    """
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if scales.dim() != 2 or scales.shape[1] % 8:
        raise ValueError(f"scales must be [G, N] with N % 8 == 0, got {tuple(scales.shape)}")
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError(f"qweight must be int32 [K, N // 8], got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    k, n = qweight.shape[0], scales.shape[1]
    g = triton.cdiv(k, group_size)
    if qweight.shape[1] * 8 != n:
        raise ValueError(f"qweight has {qweight.shape[1]} packed columns, scales N = {n}")
    if scales.shape[0] != g or not scales.dtype.is_floating_point:
        raise ValueError(f"scales must be floating [{g}, {n}], got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    if qzeros.shape != (g, n // 8) or qzeros.dtype != torch.int32:
        raise ValueError(f"qzeros must be int32 [{g}, {n // 8}], got {qzeros.dtype} "
                         f"{tuple(qzeros.shape)}")
    _check_common(x, k, n, {"qweight": qweight, "scales": scales, "qzeros": qzeros}, bias,
                  split_k)
    m = x.shape[0]
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    cfg = _config(m, x.dtype)
    # Shrink BLOCK_K to divide the group size (so a tile is one group) while it stays >= 32;
    # other group sizes take the per-row group path, whose [BLOCK_K, BLOCK_N] scale tiles
    # allow fewer pipeline stages.
    block_k = cfg.block_k
    while block_k > 32 and group_size % block_k:
        block_k //= 2
    aligned = group_size % block_k == 0
    cfg = replace(cfg, block_k=block_k) if aligned else replace(cfg, num_stages=2)
    out, grid, k_per_split, meta = _launch_args(x, n, bias, split_k, cfg)
    _w4a16_kernel[grid](
        x, qweight, scales, qzeros, bias, out, m, n, k, x.stride(0), qweight.stride(0),
        scales.stride(0), qzeros.stride(0), out.stride(0), k_per_split, group_size,
        GROUP_ALIGNED=aligned, **meta,
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)
