"""Weight-only int8 / int4 quantization in pure torch: the CPU serving path and the kernel oracle.

Dense weights are [N, K] (nn.Linear: N outputs, K inputs) and y = x @ W.T.

int8 (W8A16), symmetric per output channel:
  qweight int8 [N, K], scales float32 [N];  W ~= qweight * scales[:, None].

int4 (W4A16), asymmetric per group of `group_size` inputs (the last group may be partial):
  qweight int32 [K, N // 8]  element [k, c] holds q[k, 8c + j] in bits 4j..4j+3;
  qzeros  int32 [G, N // 8]  the zero points, packed the same way (G = ceil(K / group_size));
  scales  [G, N]             in the model dtype;
  W[n, k] ~= (q[k, n] - z[k // group_size, n]) * s[k // group_size, n].
AWQ (GEMM) checkpoints pack the same tensors with nibble j holding column 8c + AWQ_ORDER[j];
`awq_to_natural` / `natural_to_awq` convert between the two.
"""

from __future__ import annotations

import sys

import torch

# Nibble j of an AWQ-packed int32 holds output column 8c + AWQ_ORDER[j].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Its inverse: natural column j sits in AWQ nibble AWQ_INVERSE[j].
AWQ_INVERSE = (0, 4, 1, 5, 2, 6, 3, 7)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_CHUNK = 2048
_QUANT_ROWS = 4096  # weight rows quantized at a time (a multiple of 8)


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, 4, dtype=torch.int32, device=device)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Integers [..., N] in 0..15 -> int32 [..., N // 8], column 8c + j in bits 4j..4j+3.

    Checks the value range, which syncs with the device: packing happens at load time.
    """
    if values.dtype.is_floating_point or values.dtype == torch.bool:
        raise ValueError(f"pack_int4 needs an integer tensor, got {values.dtype}")
    if values.dim() == 0 or values.shape[-1] % 8:
        raise ValueError(f"the last dim must be a multiple of 8, got shape {tuple(values.shape)}")
    if values.numel() and bool(((values < 0) | (values > 15)).any()):
        raise ValueError("int4 values must lie in 0..15")
    v = values.to(torch.int64).reshape(*values.shape[:-1], values.shape[-1] // 8, 8)
    packed = (v << _shifts(values.device).to(torch.int64)).sum(-1)
    # Nibble 7 >= 8 sets bit 31: wrap to the two's-complement int32 value explicitly.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., C] -> int32 [..., 8 * C] in 0..15 (inverse of `pack_int4`)."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed int4 tensors are int32, got {packed.dtype}")
    # Arithmetic shifts smear the sign bit into the high bits; the mask drops them.
    nibbles = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 0xF
    return nibbles.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def _permute_nibbles(packed: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Nibble j of each result int32 is nibble order[j] of the input."""
    nibbles = unpack_int4(packed).reshape(*packed.shape, 8)
    idx = torch.tensor(order, dtype=torch.int64, device=packed.device)
    return pack_int4(nibbles.index_select(-1, idx).reshape(*packed.shape[:-1], -1))


def awq_to_natural(packed: torch.Tensor) -> torch.Tensor:
    """AWQ-packed int32 [R, N // 8] (qweight or qzeros) -> the natural order of `pack_int4`."""
    return _permute_nibbles(packed, AWQ_INVERSE)


def natural_to_awq(packed: torch.Tensor) -> torch.Tensor:
    """Natural-order int32 [R, N // 8] -> AWQ's interleaved nibble order."""
    return _permute_nibbles(packed, AWQ_ORDER)


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"expected a floating [N, K] weight, got {weight.dtype} "
                         f"{tuple(weight.shape)}")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (qweight int8 [N, K], scales float32 [N])."""
    _check_weight(weight)
    qs, ss = [], []
    for n0 in range(0, weight.shape[0], _QUANT_ROWS):  # bounds the fp32 temporaries
        w = weight[n0:n0 + _QUANT_ROWS].float()
        amax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
        scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))  # zero rows: any
        qs.append(torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8))
        ss.append(scales)
    if not qs:
        return (torch.empty(weight.shape, dtype=torch.int8, device=weight.device),
                torch.empty(0, dtype=torch.float32, device=weight.device))
    return torch.cat(qs), torch.cat(ss)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """int8 [N, K] and scales [N] -> dense [N, K] in `dtype`."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (qweight.to(work) * scales.to(work)[:, None]).to(dtype)


def _num_groups(k: int, group_size: int) -> int:
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    return -(-k // group_size)


def quantize_int4(weight: torch.Tensor,
                  group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-group int4 of a [N, K] weight (N % 8 == 0, any K).

    Returns (qweight int32 [K, N // 8], scales [G, N] in weight.dtype, qzeros int32 [G, N // 8]).
    """
    _check_weight(weight)
    n, k = weight.shape
    if n % 8:
        raise ValueError(f"int4 needs N % 8 == 0, got N = {n}")
    _num_groups(k, group_size)
    parts = [_quantize_int4_rows(weight[n0:n0 + _QUANT_ROWS], group_size)
             for n0 in range(0, max(n, 1), _QUANT_ROWS)]  # bounds the fp32 temporaries
    qweight, scales, qzeros = (torch.cat(p, dim=1) for p in zip(*parts))
    return qweight, scales, qzeros


def _quantize_int4_rows(weight: torch.Tensor,
                        group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = weight.shape
    g = _num_groups(k, group_size)
    # Zero padding to whole groups changes nothing: each range already includes 0.
    w = torch.zeros(n, g * group_size, dtype=torch.float32, device=weight.device)
    w[:, :k] = weight.float()
    w = w.view(n, g, group_size)
    wmin = w.amin(dim=-1).clamp(max=0.0)
    wmax = w.amax(dim=-1).clamp(min=0.0)
    scale = (wmax - wmin) / 15.0
    if weight.dtype != torch.float32:
        # Round the stored scale up, never down: a scale rounded down would push the top
        # of the range past 15 and clamp it, breaking the |error| <= scale / 2 bound.
        scale = scale * (1.0 + torch.finfo(weight.dtype).eps)
    scale = scale.to(weight.dtype)
    scale = torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
    s = scale.float()
    zeros = torch.round(-wmin / s).clamp_(0, 15)
    q = torch.round(w / s[..., None] + zeros[..., None]).clamp_(0, 15)
    q = q.view(n, g * group_size)[:, :k].to(torch.int32)
    return (pack_int4(q.t()), scale.t().contiguous(),
            pack_int4(zeros.to(torch.int32).t()))


def _check_int4(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                group_size: int) -> tuple[int, int]:
    """Validates the int4 tensor set; returns (K, N)."""
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError(f"qweight must be int32 [K, N // 8], got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    g = _num_groups(k, group_size)
    if scales.shape != (g, n) or not scales.dtype.is_floating_point:
        raise ValueError(f"scales must be floating [{g}, {n}], got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    if qzeros.shape != (g, n // 8) or qzeros.dtype != torch.int32:
        raise ValueError(f"qzeros must be int32 [{g}, {n // 8}], got {qzeros.dtype} "
                         f"{tuple(qzeros.shape)}")
    return k, n


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] (last dim contiguous) -> int8 [R, 8 * C] in natural column order.

    Works on bytes, 4x cheaper than 32-bit shifts: on little-endian hosts (all torch
    targets) byte b of an int32 holds columns 2b (low nibble) and 2b + 1 (high nibble).
    """
    if sys.byteorder != "little":
        return unpack_int4(packed).to(torch.int8)
    b = packed.view(torch.uint8)
    return torch.stack((b & 0xF, b >> 4), dim=-1).view(torch.int8).view(packed.shape[0], -1)


def _dequant_int4_cols(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                       group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense [K, n] in `dtype` from matching column slices of the packed tensors.

    (q - z) is an exact small integer and (q - z) * s is exact in fp32, so computing it in
    `dtype` (when the scales already are in it) rounds once, like fp32 then a cast.
    """
    k = qweight.shape[0]
    work = dtype if dtype == scales.dtype or dtype == torch.float64 else torch.float32
    s = scales.to(work)
    q, z = _nibbles(qweight), _nibbles(qzeros)
    n = q.shape[1]
    out = torch.empty(k, n, dtype=work, device=q.device)
    # Whole groups broadcast their zeros/scales over a [G, group_size, n] view; a partial
    # last group is done on its own.
    g_full = k // group_size
    full = g_full * group_size
    delta = torch.sub(q[:full].view(g_full, group_size, n), z[:g_full, None])
    torch.mul(delta.to(work), s[:g_full, None], out=out[:full].view(g_full, group_size, n))
    if full < k:
        torch.mul((q[full:] - z[g_full]).to(work), s[g_full], out=out[full:])
    return out.to(dtype)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                    group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The packed int4 tensor set -> dense [N, K] in `dtype`."""
    _check_int4(qweight, scales, qzeros, group_size)
    return _dequant_int4_cols(qweight, scales, qzeros, group_size, dtype).t().contiguous()


def _check_x(x: torch.Tensor, k: int, n: int, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"x must be float16/bfloat16/float32 [M, K], got {x.dtype} "
                         f"{tuple(x.shape)}")
    if x.shape[1] != k:
        raise ValueError(f"x has K = {x.shape[1]}, the weight K = {k}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")


def _chunk(chunk_size: int, multiple: int) -> int:
    if chunk_size < multiple:
        raise ValueError(f"chunk_size must be >= {multiple}, got {chunk_size}")
    return chunk_size // multiple * multiple


def int8_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None, *,
                    chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """x [M, K] @ dequant(W).T (+ bias) -> [M, N] in x.dtype.

    Converts at most `chunk_size` weight rows at a time. The per-channel scale comes out of
    the sum; fp16 runs in fp32 since x @ q (q up to 127) can overflow fp16 before scaling.
    """
    if qweight.dim() != 2 or qweight.dtype != torch.int8:
        raise ValueError(f"qweight must be int8 [N, K], got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n, k = qweight.shape
    _check_x(x, k, n, bias)
    if scales.shape != (n,):
        raise ValueError(f"scales must be [{n}], got {tuple(scales.shape)}")
    step = _chunk(chunk_size, 1)
    cdtype = torch.float32 if x.dtype == torch.float16 else x.dtype
    xc = x.to(cdtype)
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for n0 in range(0, n, step):
        n1 = min(n0 + step, n)
        part = (xc @ qweight[n0:n1].to(cdtype).t()).float() * scales[n0:n1].float()
        if bias is not None:
            part += bias[n0:n1].float()
        out[:, n0:n1] = part
    return out


def int4_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    qzeros: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                    *, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """x [M, K] @ dequant(W).T (+ bias) -> [M, N] in x.dtype.

    Dequantizes at most `chunk_size` output columns (rounded down to a multiple of 8) at a
    time. fp16 on CPU runs in fp32: CPU fp16 GEMMs are slow where they exist at all.
    """
    k, n = _check_int4(qweight, scales, qzeros, group_size)
    _check_x(x, k, n, bias)
    step = _chunk(chunk_size, 8)
    cdtype = x.dtype
    if x.dtype == torch.float16 and x.device.type == "cpu":
        cdtype = torch.float32
    xc = x.to(cdtype)
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for n0 in range(0, n, step):
        n1 = min(n0 + step, n)
        c0, c1 = n0 // 8, n1 // 8
        w = _dequant_int4_cols(qweight[:, c0:c1], scales[:, n0:n1], qzeros[:, c0:c1],
                               group_size, cdtype)
        part = xc @ w
        if bias is not None:
            part = part.float() + bias[n0:n1].float()
        out[:, n0:n1] = part
    return out
