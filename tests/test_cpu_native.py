"""The compiled CPU ops against kernels.reference (the oracle), across shapes and dtypes.

Tolerances: fp32 within 1e-5 (only summation order differs); bf16 within one bf16 ulp of
the output magnitude (2**-7 relative), since both round the same fp32 values.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels import cpu_native, reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module", autouse=True)
def _built():
    assert cpu_native.available(), cpu_native.build_error()


def _paged_setup(lens, hkv, d, block_size, num_blocks, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    need = [-(-n // block_size) for n in lens]
    # Highest block ids first, so indexing near the top of the pool is exercised.
    ids = list(range(num_blocks - 1, num_blocks - 1 - sum(need), -1))
    random.Random(seed).shuffle(ids)
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32)
    k = 0
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(ids[k:k + n], dtype=torch.int32)
        k += n
    return cache, tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window", [None, 7])
def test_paged_decode_attention(dtype, hq, hkv, block_size, window):
    d = 32 if hq == 8 else 64
    lens = [1, block_size, block_size + 1, 2 * block_size, 3, 77, 100, block_size - 1]
    cache, tables = _paged_setup(lens, hkv, d, block_size, 50_000 // block_size, dtype)
    q = torch.randn(len(lens), hq, d).to(dtype)
    scale = d ** -0.5
    ref = reference.paged_attention(q, cache, list(range(len(lens) + 1)), lens, tables, scale,
                                    sliding_window=window, num_decodes=len(lens))
    out = torch.full_like(q, float("nan"))
    cpu_native.paged_decode_attention(out, q, cache, tables, torch.tensor(lens,
                                      dtype=torch.int32), scale, window)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_paged_decode_attention_few_sequences_split_heads():
    """Fewer sequences than threads x 4 takes the per-head split path."""
    lens = [300]
    cache, tables = _paged_setup(lens, 4, 64, 16, 64, torch.float32)
    q = torch.randn(1, 8, 64)
    ref = reference.paged_attention(q, cache, [0, 1], lens, tables, 0.125, num_decodes=1)
    out = torch.empty_like(q)
    cpu_native.paged_decode_attention(out, q, cache, tables, torch.tensor(lens,
                                      dtype=torch.int32), 0.125)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_paged_decode_attention_rejects_bad_input():
    cache = torch.zeros(2, 4, 16, 2, 32)
    q = torch.zeros(3, 4, 32)
    with pytest.raises(RuntimeError, match="int32"):
        cpu_native.paged_decode_attention(torch.empty_like(q), q, cache,
                                          torch.zeros(3, 2, dtype=torch.int64),
                                          torch.ones(3, dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_native.paged_decode_attention(torch.empty_like(q), q, cache.bfloat16(),
                                          torch.zeros(3, 2, dtype=torch.int32),
                                          torch.ones(3, dtype=torch.int32), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    x = torch.randn(37, 96).to(dtype)
    w = (1 + 0.1 * torch.randn(96)).to(dtype)
    res = torch.randn(37, 96).to(dtype) if with_residual else None
    ref = reference.rms_norm(x, w, 1e-6, res)
    got = cpu_native.rms_norm(x, w, 1e-6, res)
    if with_residual:
        torch.testing.assert_close(got[1], ref[1], atol=0, rtol=0)  # the sum is exact
        ref, got = ref[0], got[0]
    torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot_dim", [64, 32])
def test_rotary_neox_on_strided_qkv_slices(dtype, rot_dim):
    qkv = torch.randn(19, 4 * 64 + 2 * 2 * 64).to(dtype)
    q, k, _ = qkv.split([256, 128, 128], dim=-1)
    cache = reference.build_cos_sin_cache(rot_dim, 4096, 10000.0)
    pos = torch.tensor([0, 1, 2, 4095] + list(range(100, 115)))
    rq, rk = reference.rotary_embedding(pos, q, k, cache, 64)
    nq, nk = cpu_native.rotary_neox(pos, q, k, cache, 64)
    for a, b in ((rq, nq), (rk, nk)):
        assert a.shape == b.shape
        torch.testing.assert_close(b.float(), a.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    x = (3 * torch.randn(11, 2 * 80)).to(dtype)
    torch.testing.assert_close(cpu_native.silu_and_mul(x).float(),
                               reference.silu_and_mul(x).float(),
                               atol=TOL[dtype], rtol=TOL[dtype])
