"""Weight-only quantization: kernels.quant (packing, AWQ order, quantize, reference matmuls)
and the Triton W8A16 / W4A16 matmuls against float64 products of the dequantized weights."""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels import quant as Q
from kernels import triton_quant_matmul as TQ
from kernels.triton_quant_matmul import w4a16_matmul, w8a16_matmul

# Kernel outputs vs a float64 oracle, as max |err| / max |oracle|. fp32: accumulation order
# only. fp16/bf16: the output rounding (the interpreter truncates instead of rounding, up to
# 2^-7 relative in bf16) and, on the per-row group path, weights rounded to the dtype.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1.5e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_close(out: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == oracle.shape
    scale = oracle.abs().max().item()
    err = (out.double().cpu() - oracle.cpu()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} vs output scale {scale:.3g}"


def _case(m: int, k: int, n: int, dtype: torch.dtype, device: str, seed: int, bias: bool):
    """Random weight [N, K] (a few zero rows and one-signed rows), x [M, K], optional bias."""
    g = _gen(seed)
    w = torch.randn(n, k, generator=g)
    w[0] = 0.0
    w[1] = w[1].abs()
    w[2] = -w[2].abs()
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    b = torch.randn(n, generator=g).to(dtype).to(device) if bias else None
    return w, x, b


def _oracle(x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ dense.double().t()
    return y if bias is None else y + bias.double()


# --- packing and the AWQ order ---------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 8), (5, 16), (3, 4, 40), (64, 256)])
def test_pack_unpack_round_trip(kernel_device, shape):
    vals = torch.randint(0, 16, shape, generator=_gen(1), dtype=torch.int32).to(kernel_device)
    vals[..., -1] = 15  # sets bit 31 of the last int32 of each row
    packed = Q.pack_int4(vals)
    assert packed.dtype == torch.int32 and packed.shape == (*shape[:-1], shape[-1] // 8)
    assert torch.equal(Q.unpack_int4(packed).long(), vals.long())
    awq = Q.natural_to_awq(packed)
    assert not torch.equal(awq, packed)
    assert torch.equal(Q.awq_to_natural(awq), packed)
    assert torch.equal(Q.natural_to_awq(Q.awq_to_natural(packed)), packed)


def test_known_vectors(kernel_device):
    vals = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device=kernel_device)
    natural = Q.pack_int4(vals)
    assert natural.item() == 0x87654321 - 2**32
    # AWQ nibbles, low to high, hold columns 0, 2, 4, 6, 1, 3, 5, 7: values 1,3,5,7,2,4,6,8.
    awq = Q.natural_to_awq(natural)
    assert awq.item() == 0x86427531 - 2**32
    assert Q.awq_to_natural(awq).item() == natural.item()
    assert Q.pack_int4(torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 0, 0, 0, 0, 0, 1]])).tolist() \
        == [[0, 0x1000000F]]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        Q.pack_int4(torch.zeros(2, 12, dtype=torch.int32))
    with pytest.raises(ValueError):
        Q.pack_int4(torch.full((1, 8), 16))
    with pytest.raises(ValueError):
        Q.pack_int4(torch.zeros(1, 8))


def _awq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM-style packing, column by column: nibble i <- column 8c + order[i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, cols = intweight.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for i in range(8):
            out[:, c] |= intweight[:, 8 * c + order[i]].long() << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_checkpoint_converts_to_natural_layout(group_size):
    n, k = 48, 256
    w = torch.randn(n, k, generator=_gen(2)).half()
    # What an AWQ checkpoint stores for w: the same integers, interleaved, fp16 scales.
    qweight, scales, qzeros = Q.quantize_int4(w, group_size)
    intweight = Q.unpack_int4(qweight)
    intzeros = Q.unpack_int4(qzeros)
    assert intweight.shape == (k, n) and int(intweight.max()) <= 15 and int(intweight.min()) >= 0
    awq_qweight, awq_qzeros = _awq_pack(intweight), _awq_pack(intzeros)
    assert not torch.equal(awq_qweight, qweight)
    assert torch.equal(Q.awq_to_natural(awq_qweight), qweight)
    assert torch.equal(Q.awq_to_natural(awq_qzeros), qzeros)
    assert torch.equal(Q.natural_to_awq(qweight), awq_qweight)
    # Unpacked the AWQ way (reverse order), the checkpoint gives the same dense weight.
    rev = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    awq_int = Q.unpack_int4(awq_qweight).view(k, n // 8, 8)[..., rev].reshape(k, n)
    assert torch.equal(awq_int, intweight)


# --- quantize / dequantize --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_quantization_error(kernel_device, dtype):
    w = (torch.randn(40, 96, generator=_gen(3)) * 3).to(dtype).to(kernel_device)
    w[5] = 0.0
    q, s = Q.quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (40,)
    assert int(q.abs().max()) == 127
    err = (w.double() - Q.dequantize_int8(q, s, torch.float64)).abs()
    assert bool((err <= s.double()[:, None] * 0.5 * (1 + 1e-5)).all())
    assert Q.dequantize_int8(q, s, dtype).dtype == dtype
    assert bool((Q.dequantize_int8(q, s, dtype)[5] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,group_size", [(256, 32), (688, 128), (100, 64), (96, 96)])
def test_int4_quantization_error(kernel_device, dtype, k, group_size):
    n = 24
    w = (torch.randn(n, k, generator=_gen(4)) * 2).to(dtype).to(kernel_device)
    w[0] = 0.0
    w[1] = w[1].abs() + 0.5  # all positive: zero point 0
    w[2] = -w[2].abs()       # all negative: zero point 15
    qweight, scales, qzeros = Q.quantize_int4(w, group_size)
    g = -(-k // group_size)
    assert qweight.shape == (k, n // 8) and qweight.dtype == torch.int32
    assert qzeros.shape == (g, n // 8) and qzeros.dtype == torch.int32
    assert scales.shape == (g, n) and scales.dtype == dtype
    z = Q.unpack_int4(qzeros)
    assert bool((z[:, 2] == 15).all()) and bool((z[:, 1] == 0).all())
    deq = Q.dequantize_int4(qweight, scales, qzeros, group_size, torch.float64)
    per_elem = scales.double().t().repeat_interleave(group_size, dim=1)[:, :k]
    err = (w.double() - deq).abs()
    assert bool((err <= per_elem * 0.5 * (1 + 1e-5) + 1e-12).all())
    assert bool((deq[0] == 0).all())
    # Coarse sanity: int4 keeps the weight to within ~1/30 of each group's range.
    assert err.max().item() < 0.2 * w.double().abs().max().item()


def test_quantize_in_row_chunks_matches_whole(monkeypatch):
    w = torch.randn(40, 100, generator=_gen(8)).bfloat16()
    whole4, whole8 = Q.quantize_int4(w, 32), Q.quantize_int8(w)
    monkeypatch.setattr(Q, "_QUANT_ROWS", 16)  # 3 chunks, the last partial
    for a, b in zip(Q.quantize_int4(w, 32) + Q.quantize_int8(w), whole4 + whole8):
        assert torch.equal(a, b)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError):
        Q.quantize_int4(torch.randn(12, 64), 32)
    with pytest.raises(ValueError):
        Q.quantize_int4(torch.randn(16, 64), 0)
    with pytest.raises(ValueError):
        Q.quantize_int8(torch.randn(16))


# --- reference matmuls ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [Q.DEFAULT_CHUNK, 40])
def test_reference_matmuls_match_dense(kernel_device, dtype, chunk_size):
    m, k, n = 5, 200, 136  # K % group != 0; chunk 40 -> 4 chunks, the last one partial
    w, x, b = _case(m, k, n, dtype, kernel_device, seed=5, bias=True)
    q8, s8 = Q.quantize_int8(w.to(kernel_device))
    y8 = Q.int8_matmul_ref(x, q8, s8, b, chunk_size=chunk_size)
    assert y8.dtype == dtype
    _assert_close(y8, _oracle(x, Q.dequantize_int8(q8, s8, torch.float64), b), dtype)
    qw, sc, qz = Q.quantize_int4(w.to(dtype).to(kernel_device), 64)
    y4 = Q.int4_matmul_ref(x, qw, sc, qz, 64, b, chunk_size=chunk_size)
    assert y4.dtype == dtype
    _assert_close(y4, _oracle(x, Q.dequantize_int4(qw, sc, qz, 64, torch.float64), b), dtype)
    # The chunked path gives what one chunk gives.
    one = Q.int4_matmul_ref(x, qw, sc, qz, 64, b, chunk_size=n)
    torch.testing.assert_close(y4, one, atol=1e-5 if dtype == torch.float32 else 1e-2,
                               rtol=1e-5 if dtype == torch.float32 else 1e-2)


def test_reference_int4_with_foreign_scale_dtype():
    """fp16 AWQ scales serving a bf16 model: dequantized once in fp32, then cast."""
    w, x, _ = _case(3, 128, 16, torch.bfloat16, "cpu", seed=6, bias=False)
    qw, sc, qz = Q.quantize_int4(w.half(), 32)
    y = Q.int4_matmul_ref(x, qw, sc, qz, 32)
    dense = Q.dequantize_int4(qw, sc, qz, 32, torch.bfloat16)
    torch.testing.assert_close(y, x @ dense.t(), atol=1e-2, rtol=1e-2)


# --- Triton kernels ---------------------------------------------------------------------------

MS = (1, 3, 16, 33)
SHAPES = ((256, 384), (688, 256))
SPLITS = (None, 1, 2, 4)


def _w8_cases():
    # Every (dtype, M, shape); split_k and bias rotate so each pair of them appears too.
    for i, (dtype, m, (k, n)) in enumerate(itertools.product(DTYPES, MS, SHAPES)):
        yield pytest.param(dtype, m, k, n, SPLITS[i % 4], (i // 4) % 2 == 0,
                           id=f"{str(dtype)[6:]}-m{m}-k{k}-n{n}-s{SPLITS[i % 4]}-b{(i // 4) % 2}")


def _w4_cases():
    prod = itertools.product(DTYPES, MS, SHAPES, (32, 64, 128))
    for i, (dtype, m, (k, n), gs) in enumerate(prod):
        split, bias = SPLITS[i % 4], (i // 4) % 2 == 0
        yield pytest.param(dtype, m, k, n, gs, split, bias,
                           id=f"{str(dtype)[6:]}-m{m}-k{k}-n{n}-g{gs}-s{split}-b{int(bias)}")


@pytest.mark.parametrize("dtype,m,k,n,split_k,bias", list(_w8_cases()))
def test_w8a16_matches_dequant_matmul(kernel_device, dtype, m, k, n, split_k, bias):
    w, x, b = _case(m, k, n, dtype, kernel_device, seed=m * 7 + k, bias=bias)
    q, s = Q.quantize_int8(w.to(kernel_device))
    y = w8a16_matmul(x, q, s, b, split_k=split_k)
    assert y.dtype == dtype and y.device == x.device
    _assert_close(y, _oracle(x, Q.dequantize_int8(q, s, torch.float64), b), dtype)


@pytest.mark.parametrize("dtype,m,k,n,group_size,split_k,bias", list(_w4_cases()))
def test_w4a16_matches_dequant_matmul(kernel_device, dtype, m, k, n, group_size, split_k, bias):
    w, x, b = _case(m, k, n, dtype, kernel_device, seed=m * 5 + k + group_size, bias=bias)
    qw, sc, qz = Q.quantize_int4(w.to(dtype).to(kernel_device), group_size)
    y = w4a16_matmul(x, qw, sc, qz, group_size, b, split_k=split_k)
    assert y.dtype == dtype and y.device == x.device
    _assert_close(y, _oracle(x, Q.dequantize_int4(qw, sc, qz, group_size, torch.float64), b),
                  dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size,split_k", [(128, 3), (48, 2), (100, None), (688, 1)])
def test_w4a16_tails_and_odd_groups(kernel_device, dtype, group_size, split_k):
    """N not a multiple of the column tile, groups that are not a power of two (48, 688:
    aligned tiles of 16/32; 100: the per-row group path)."""
    m, k, n = 2, 688, 200
    w, x, b = _case(m, k, n, dtype, kernel_device, seed=group_size, bias=True)
    qw, sc, qz = Q.quantize_int4(w.to(dtype).to(kernel_device), group_size)
    y = w4a16_matmul(x, qw, sc, qz, group_size, b, split_k=split_k)
    _assert_close(y, _oracle(x, Q.dequantize_int4(qw, sc, qz, group_size, torch.float64), b),
                  dtype)
    _assert_close(Q.int4_matmul_ref(x, qw, sc, qz, group_size, b), _oracle(
        x, Q.dequantize_int4(qw, sc, qz, group_size, torch.float64), b), dtype)


def test_w8a16_column_tail_and_fp16_scales(kernel_device):
    m, k, n = 17, 136, 200
    w, x, b = _case(m, k, n, torch.float16, kernel_device, seed=9, bias=True)
    q, s = Q.quantize_int8(w.to(kernel_device))
    y = w8a16_matmul(x, q, s.half(), b, split_k=3)
    _assert_close(y, _oracle(x, Q.dequantize_int8(q, s.half(), torch.float64), b),
                  torch.float16)


def test_split_k_heuristic(monkeypatch):
    """Decode shapes split K to fill ~2 waves of SMs; prefill and wide outputs do not."""
    monkeypatch.setattr(TQ, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    cfg = TQ._config(1, torch.bfloat16)  # 16 x 64 tiles, BLOCK_K 128
    splits, per_split = TQ._split_plan(1, 4096, 4096, cfg, None, cuda)
    assert splits == 5 and per_split == 7 * 128  # 64 column tiles * 5 >= 264 programs
    assert splits * per_split >= 4096 > (splits - 1) * per_split
    assert TQ._split_plan(1, 152064, 4096, cfg, None, cuda)[0] == 1
    assert TQ._split_plan(1, 64, 256, cfg, None, cuda)[0] == 1  # 2 K tiles: 1 split each
    assert TQ._split_plan(64, 4096, 4096, TQ._config(64, torch.bfloat16), None, cuda)[0] == 1
    # Explicit requests are honoured, capped at one K tile per split.
    assert TQ._split_plan(1, 4096, 4096, cfg, 4, cuda) == (4, 8 * 128)
    assert TQ._split_plan(1, 4096, 256, cfg, 8, cuda) == (2, 128)


def test_empty_batch(kernel_device):
    q, s = Q.quantize_int8(torch.randn(16, 32).to(kernel_device))
    x = torch.empty(0, 32, device=kernel_device)
    assert w8a16_matmul(x, q, s).shape == (0, 16)


def test_wrapper_errors(kernel_device):
    dev = kernel_device
    x = torch.randn(2, 64, device=dev)
    q8, s8 = Q.quantize_int8(torch.randn(16, 64).to(dev))
    qw, sc, qz = Q.quantize_int4(torch.randn(16, 64).to(dev), 32)
    bad = [
        lambda: w8a16_matmul(x.double(), q8, s8),                       # x dtype
        lambda: w8a16_matmul(x.to(torch.int32), q8, s8),
        lambda: w8a16_matmul(x[:, :32], q8, s8),                        # K mismatch
        lambda: w8a16_matmul(x, q8.to(torch.int32), s8),                # qweight dtype
        lambda: w8a16_matmul(x, q8, s8[:8]),                            # scales shape
        lambda: w8a16_matmul(x, q8, s8, torch.zeros(8, device=dev)),    # bias shape
        lambda: w8a16_matmul(torch.randn(64, 2, device=dev).t(), q8, s8),  # not contiguous
        lambda: w8a16_matmul(x, q8, s8, split_k=0),
        lambda: w8a16_matmul(x[0], q8, s8),                             # 1-D x
        lambda: w4a16_matmul(x, qw, sc[:, :12], qz, 32),                # N % 8 != 0
        lambda: w4a16_matmul(x, qw, sc[:, :8], qz, 32),                 # N mismatch
        lambda: w4a16_matmul(x, qw, sc, qz, 16),                        # group count
        lambda: w4a16_matmul(x, qw, sc, qz, 0),
        lambda: w4a16_matmul(x, qw, sc, qz.view(torch.float32), 32),    # qzeros dtype
        lambda: w4a16_matmul(x, qw.view(torch.float32), sc, qz, 32),    # qweight dtype
        lambda: w4a16_matmul(x[:, :32], qw, sc, qz, 32),                # K mismatch
        lambda: w4a16_matmul(x, qw, sc.to(torch.int32), qz, 32),        # scales dtype
    ]
    for i, call in enumerate(bad):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"case {i} did not raise")
    # The well-formed calls run.
    assert w8a16_matmul(x, q8, s8).shape == (2, 16)
    assert w4a16_matmul(x, qw, sc, qz, 32).shape == (2, 16)
