"""Triton write_kv, rms_norm, rotary_embedding and silu_and_mul against kernels.reference.

Runs on `kernel_device`: natively on a GPU, else on CPU under the Triton interpreter.
Tolerances: fp32 1e-5; bf16/fp16 2e-2 (compared in fp32). The interpreter truncates
fp32 -> bf16 casts where GPUs round to nearest even, so bf16 results that pass through an
in-kernel downcast can sit one bf16 ulp from the reference there; same-dtype copies are exact.
"""

from __future__ import annotations

import pytest
import torch

from kernels import reference as R
from kernels.triton_fused import rms_norm, rotary_embedding, silu_and_mul
from kernels.triton_kv_write import write_kv

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def _randn(*shape: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# write_kv
# --------------------------------------------------------------------------------------------


def _kv_case(device: str, dtype: torch.dtype, cache_dtype: torch.dtype, hkv: int, d: int,
             num_tokens: int, num_blocks: int = 64, block_size: int = 16, hq: int = 4):
    """Strided key/value slices of a fused qkv tensor, a random cache, scattered slots."""
    qkv = _randn(num_tokens, (hq + 2 * hkv) * d, dtype=dtype, device=device, seed=1)
    key = qkv[:, hq * d:(hq + hkv) * d].view(num_tokens, hkv, d)
    value = qkv[:, (hq + hkv) * d:].view(num_tokens, hkv, d)
    cache = _randn(2, num_blocks, block_size, hkv, d, dtype=cache_dtype, device=device, seed=2)
    total = num_blocks * block_size
    # The pool's very last slots first, then distinct random ones.
    top = [total - 1, total - 2, block_size * (num_blocks - 1)]
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(3)).tolist()
    slots = top + [s for s in perm if s not in top][: num_tokens - 3]
    return key, value, cache, torch.tensor(slots, device=device)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_kv_matches_reference_exactly(kernel_device, dtype, slot_dtype):
    key, value, cache, slots = _kv_case(kernel_device, dtype, dtype, hkv=2, d=32, num_tokens=20)
    assert not key.is_contiguous() and key.stride(0) == (4 + 2 * 2) * 32
    before = cache.clone()
    expected = cache.clone()
    R.write_kv(key, value, expected, slots)
    write_kv(key, value, cache, slots.to(slot_dtype))
    assert torch.equal(cache, expected)
    written = torch.zeros(cache.shape[1] * cache.shape[2], dtype=torch.bool, device=kernel_device)
    written[slots] = True
    written = written.view(cache.shape[1], cache.shape[2])
    assert torch.equal(cache[:, ~written], before[:, ~written])  # untouched slots
    assert not torch.equal(cache[:, written], before[:, written])


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
def test_write_kv_casts_to_cache_dtype(kernel_device, cache_dtype):
    # A 40 x 64 row (2560, not a power of two) also spans two column blocks of the grid.
    key, value, cache, slots = _kv_case(kernel_device, torch.float32, cache_dtype, hkv=40, d=64,
                                        num_tokens=5, num_blocks=8, block_size=4)
    before = cache.clone()
    expected = cache.clone()
    R.write_kv(key, value, expected, slots)
    write_kv(key, value, cache, slots)
    _close(cache, expected, cache_dtype)
    flat, flat_before = cache.view(2, -1, 40, 64), before.view(2, -1, 40, 64)
    untouched = torch.ones(flat.shape[1], dtype=torch.bool, device=kernel_device)
    untouched[slots] = False
    assert torch.equal(flat[:, untouched], flat_before[:, untouched])


def test_write_kv_skips_negative_slots(kernel_device):
    key, value, cache, slots = _kv_case(kernel_device, torch.float32, torch.float32, hkv=2, d=16,
                                        num_tokens=6, num_blocks=4, block_size=4)
    slots[2] = -1  # a padded token: documented to be skipped
    expected = cache.clone()
    keep = slots >= 0
    R.write_kv(key[keep], value[keep], expected, slots[keep])
    write_kv(key, value, cache, slots)
    assert torch.equal(cache, expected)


def test_write_kv_empty_is_noop(kernel_device):
    cache = torch.zeros(2, 4, 4, 2, 16, device=kernel_device)
    empty = torch.empty(0, 2, 16, device=kernel_device)
    write_kv(empty, empty, cache, torch.empty(0, dtype=torch.int64, device=kernel_device))
    assert not cache.any()


# --------------------------------------------------------------------------------------------
# rms_norm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96, 4096, 16384])  # 16384: the chunked two-pass path
def test_rms_norm(kernel_device, hidden, dtype, with_residual):
    num_tokens, eps = 3, 1e-6
    # Rows of x are strided: x is the left part of a wider buffer.
    wide = _randn(num_tokens, hidden + 32, dtype=dtype, device=kernel_device, seed=4)
    x = wide[:, :hidden]
    weight = _randn(hidden, dtype=dtype, device=kernel_device, seed=5)
    x_before = x.clone()
    if not with_residual:
        out = rms_norm(x, weight, eps)
        _close(out, R.rms_norm(x, weight, eps), dtype)
    else:
        residual = _randn(num_tokens, hidden, dtype=dtype, device=kernel_device, seed=6)
        ref_out, ref_sum = R.rms_norm(x, weight, eps, residual.clone())
        out, summed = rms_norm(x, weight, eps, residual)
        assert summed is residual  # documented: the sum is written into `residual`
        _close(summed, ref_sum, dtype)
        _close(out, ref_out, dtype)
    assert out.shape == (num_tokens, hidden) and out.is_contiguous()
    assert torch.equal(x, x_before)


def test_rms_norm_strided_residual_and_promoted_weight(kernel_device):
    wide = _randn(5, 300, dtype=torch.bfloat16, device=kernel_device, seed=7)
    wide_before = wide.clone()
    x, residual = wide[:, :100], wide[:, 150:250]
    weight = _randn(100, dtype=torch.float32, device=kernel_device, seed=8)
    ref_out, ref_sum = R.rms_norm(x.clone(), weight, 1e-5, residual.clone())
    out, summed = rms_norm(x, weight, 1e-5, residual)
    assert out.dtype == torch.float32  # promote(bf16, fp32), as the reference
    _close(summed, ref_sum, torch.bfloat16)
    _close(out, ref_out, torch.bfloat16)
    others = torch.ones(300, dtype=torch.bool, device=kernel_device)
    others[150:250] = False
    assert torch.equal(wide[:, others], wide_before[:, others])  # only `residual` is written


# --------------------------------------------------------------------------------------------
# rotary_embedding
# --------------------------------------------------------------------------------------------

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
MAX_POS = 1 << 15

ROPE_CASES = [
    # (is_neox, head_dim, rot_dim, hq, hkv, scaling, dtype, three_d)
    (True, 128, 128, 8, 2, None, torch.float32, False),
    (False, 64, 64, 4, 4, LLAMA3, torch.float32, True),
    (True, 64, 32, 6, 2, YARN, torch.float32, False),
    (False, 32, 16, 2, 1, None, torch.float32, False),
    (True, 128, 128, 32, 8, LLAMA3, torch.bfloat16, False),
    (False, 128, 64, 12, 4, YARN, torch.bfloat16, True),
    (True, 32, 32, 3, 1, None, torch.bfloat16, False),
]


@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: f"neox{c[0]}-d{c[1]}-r{c[2]}-"
                         f"h{c[3]}x{c[4]}-{(c[5] or {}).get('rope_type', 'default')}-"
                         f"{str(c[6])[6:]}-{'3d' if c[7] else '2d'}")
def test_rotary_embedding(kernel_device, case, pos_dtype):
    is_neox, head_dim, rot_dim, hq, hkv, scaling, dtype, three_d = case
    num_tokens = 7
    cache = R.build_cos_sin_cache(rot_dim, MAX_POS, 10000.0, scaling, device=kernel_device)
    g = torch.Generator().manual_seed(9)
    positions = torch.cat([torch.tensor([0, MAX_POS - 1, MAX_POS - 2]),
                           torch.randint(0, MAX_POS, (num_tokens - 3,), generator=g)])
    positions = positions.to(device=kernel_device, dtype=pos_dtype)
    qkv = _randn(num_tokens, (hq + 2 * hkv) * head_dim, dtype=dtype, device=kernel_device, seed=10)
    qkv_before = qkv.clone()
    q = qkv[:, : hq * head_dim]
    k = qkv[:, hq * head_dim:(hq + hkv) * head_dim]
    if three_d:
        q, k = q.view(num_tokens, hq, head_dim), k.view(num_tokens, hkv, head_dim)
    ref_q, ref_k = R.rotary_embedding(positions.long(), q.clone(), k.clone(), cache, head_dim,
                                      is_neox)
    out_q, out_k = rotary_embedding(positions, q, k, cache, head_dim, is_neox)
    assert out_q is q and out_k is k
    _close(q, ref_q, dtype)
    _close(k, ref_k, dtype)
    assert not torch.equal(q, qkv_before[:, : hq * head_dim].view(q.shape))
    assert torch.equal(qkv[:, (hq + hkv) * head_dim:], qkv_before[:, (hq + hkv) * head_dim:])
    if rot_dim < head_dim:  # the tail of each head is passed through bit for bit
        tail = qkv.view(num_tokens, -1, head_dim)[..., rot_dim:]
        assert torch.equal(tail, qkv_before.view(num_tokens, -1, head_dim)[..., rot_dim:])


# --------------------------------------------------------------------------------------------
# silu_and_mul
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [64, 100, 688, 1500])  # 1500: two column blocks
def test_silu_and_mul(kernel_device, inter, dtype):
    wide = _randn(4, 2 * inter + 8, dtype=dtype, device=kernel_device, seed=11) * 4
    x = wide[:, : 2 * inter]  # strided rows
    x[0, :4] = torch.tensor([-100.0, 100.0, -30.0, 0.0])  # saturated gates stay finite
    out = silu_and_mul(x)
    assert out.shape == (4, inter) and torch.isfinite(out).all()
    _close(out, R.silu_and_mul(x), dtype)


# --------------------------------------------------------------------------------------------
# Wrapper validation
# --------------------------------------------------------------------------------------------


def _bad_calls(dev: str):
    f32 = dict(device=dev, dtype=torch.float32)
    cache = torch.zeros(2, 4, 4, 2, 16, **f32)
    kv = torch.zeros(3, 2, 16, **f32)
    slots = torch.arange(3, device=dev)
    x = torch.zeros(3, 64, **f32)
    w = torch.ones(64, **f32)
    pos = torch.zeros(3, dtype=torch.int64, device=dev)
    cs = torch.zeros(16, 32, **f32)
    q = torch.zeros(3, 4 * 32, **f32)
    return {
        "kv_bad_head_dim": lambda: write_kv(torch.zeros(3, 2, 8, **f32), kv, cache, slots),
        "kv_cache_4d": lambda: write_kv(kv, kv, cache[0], slots),
        "kv_cache_noncontig": lambda: write_kv(kv, kv, cache.transpose(3, 4), slots),
        "kv_slots_float": lambda: write_kv(kv, kv, cache, slots.float()),
        "kv_slots_len": lambda: write_kv(kv, kv, cache, slots[:2]),
        "kv_key_last_stride": lambda: write_kv(torch.zeros(3, 16, 2, **f32).transpose(1, 2),
                                               kv, cache, slots),
        "kv_value_head_stride": lambda: write_kv(kv, torch.zeros(3, 2, 32, **f32)[..., :16],
                                                 cache, slots),
        "kv_value_tokens": lambda: write_kv(kv, kv[:2], cache, slots),
        "kv_int_key": lambda: write_kv(kv.int(), kv, cache, slots),
        "kv_meta_device": lambda: write_kv(kv.to("meta"), kv.to("meta"), cache.to("meta"),
                                           slots.to("meta")),
        "norm_3d": lambda: rms_norm(x.view(3, 4, 16), w, 1e-6),
        "norm_weight_len": lambda: rms_norm(x, w[:32], 1e-6),
        "norm_col_stride": lambda: rms_norm(torch.zeros(64, 3, **f32).t(), w, 1e-6),
        "norm_residual_dtype": lambda: rms_norm(x, w, 1e-6, x.to(torch.bfloat16)),
        "norm_residual_shape": lambda: rms_norm(x, w, 1e-6, x[:2]),
        "norm_int": lambda: rms_norm(x.int(), w, 1e-6),
        "rope_pos_float": lambda: rotary_embedding(pos.float(), q, q.clone(), cs, 32),
        "rope_pos_len": lambda: rotary_embedding(pos[:2], q, q.clone(), cs, 32),
        "rope_cache_dtype": lambda: rotary_embedding(pos, q, q.clone(), cs.half(), 32),
        "rope_rot_gt_head": lambda: rotary_embedding(pos, q, q.clone(), cs, 16),
        "rope_width": lambda: rotary_embedding(pos, q[:, :100], q.clone(), cs, 32),
        "rope_3d_head_dim": lambda: rotary_embedding(pos, q.view(3, 2, 64), q.clone(), cs, 32),
        "rope_odd_rot": lambda: rotary_embedding(pos, q, q.clone(), cs[:, :31], 32),
        "silu_odd": lambda: silu_and_mul(torch.zeros(3, 7, **f32)),
        "silu_1d": lambda: silu_and_mul(torch.zeros(8, **f32)),
    }


@pytest.mark.parametrize("name", sorted(_bad_calls("cpu")))
def test_wrappers_reject_bad_inputs(kernel_device, name):
    with pytest.raises(ValueError):
        _bad_calls(kernel_device)[name]()
